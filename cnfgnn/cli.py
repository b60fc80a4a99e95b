"""``cnfgnn``: train and test one experiment (Hydra), write its run directory.

Usage::

    cnfgnn [KEY=VALUE ...] [GROUP=OPTION ...] [-v] [--multirun] [hydra flags]

Examples::

    cnfgnn                                   # the default: CNFGNN on the synthetic network
    cnfgnn experiment=los_loop_cnfgnn
    cnfgnn federation.rounds=5 federation.nodes_per_client=8
    cnfgnn engine=simulation logger=tensorboard
    cnfgnn threads=2 device=cpu progress=false
    cnfgnn --multirun seed=1,2,3

Groups (GROUP=OPTION, files under ``conf/``): experiment, dataset, model, federation,
engine, privacy, logger. Every key of ``conf/config.yaml`` and of the chosen options can be
set with KEY=VALUE (``cnfgnn --cfg job`` prints the composed config). The run directory
(``outputs/<name>/<timestamp>_<seed>/``) gets config.yaml, metrics.jsonl, final.json,
checkpoint.pt, plots/ and run.log (the full log). ``-v`` (or ``hydra.verbose=true``) shows
debug records. A misspelt key or option exits 2 naming the close matches.
``--hydra-help`` shows Hydra's own flags.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnfgnn.config import CONF_DIR


def format_table(final: dict) -> str:
    """Per-horizon test metrics as a small text table (horizons in minutes when ``final``
    records the data's step length, ``interval_minutes``; else in steps)."""
    t = final["test"]
    step = final.get("interval_minutes")
    rows = [f"{'horizon':>8} {'MAE':>8} {'RMSE':>8} {'MAPE%':>8}   (masked)"]
    for h in (3, 6, 12):
        if f"masked_mae_h{h}" in t:
            when = f"{h * step:g}min" if step else f"{h} steps"
            rows.append(
                f"{when:>9} {t[f'masked_mae_h{h}']:8.3f} {t[f'masked_rmse_h{h}']:8.3f}"
                f" {100 * t[f'masked_mape_h{h}']:8.2f}"
            )
    rows.append(
        f"{'average':>8} {t['masked_mae']:8.3f} {t['masked_rmse']:8.3f} "
        f"{100 * t['masked_mape']:8.2f}"
    )
    rows.append(
        f"paper protocol (unmasked, all horizons): RMSE {t['rmse']:.3f}  MAE {t['mae']:.3f}"
    )
    return "\n".join(rows)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _main(cfg: DictConfig) -> None:
    from cnfgnn import logs
    from cnfgnn.api import run_experiment

    hc = HydraConfig.get()
    if hc.verbose:  # hydra.verbose=true (or a list of loggers)
        logs.setup(verbose=True)
    run_dir = cfg.run_dir or hc.runtime.output_dir
    final, writer = run_experiment(cfg, run_dir=run_dir)
    print(format_table(final))
    print(
        f"best round {final['best_round']} of {final['rounds_run']}; "
        f"{final['bytes_total'] / 1e6:.1f} MB communicated; {final['seconds_total']:.1f} s"
    )
    print(f"outputs: {writer.dir}")


#: Hydra flags after which the composed config is not the default one: not pre-checked.
_OTHER_CONFIG = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


def _sweep_probe(override: str, conf: Path) -> str:
    """One value of a sweep override that composes like it: a group's first option, else null."""
    key, _, value = override.partition("=")
    if (conf / key.lstrip("+~")).is_dir() or not any(c in value for c in "([{'\""):
        return f"{key}={value.split(',')[0]}"
    return f"{key}=null"  # range(...), [..], quoted: the key alone is checked


def _run(args: list[str]) -> None:
    """Check the overrides (exit 2 with close key names), then hand over to Hydra."""
    from cnfgnn import paths, shell

    overrides = [
        a
        for a in args
        if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")
    ]
    if not any(a in _OTHER_CONFIG or a.split("=")[0] in _OTHER_CONFIG for a in args):
        if any(a in ("-m", "--multirun") for a in args):  # sweeps: check keys, group options
            overrides = [_sweep_probe(o, paths.conf_dir()) for o in overrides]
        shell.compose(overrides)
    if not any(a.startswith("hydra/job_logging=") for a in args):
        args = ["hydra/job_logging=none", *args]  # cnfgnn logs itself: stderr and run.log
    sys.argv = [sys.argv[0], *args]
    # Hydra prints errors of the job itself and exits 1; with this it re-raises them, so the
    # console shell reports bad input (a missing file, a mismatched graph) in one line, exit 2
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _main()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: exit status 0, or 2 on a bad key/option."""
    from cnfgnn.shell import console

    return console("cnfgnn", __doc__, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
