"""Hydra entry point: ``cnfgnn [overrides]`` runs one experiment.

Examples::

    cnfgnn                                   # the default: CNFGNN on the synthetic network
    cnfgnn experiment=los_loop_cnfgnn
    cnfgnn federation.rounds=5 federation.nodes_per_client=8
    cnfgnn --multirun seed=1,2,3
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnfgnn.config import CONF_DIR
from cnfgnn.experiment import run_experiment


def format_table(final: dict) -> str:
    """Per-horizon test metrics as a small text table (horizons in minutes when ``final``
    records the data's step length, ``interval_minutes``; else in steps)."""
    t = final["test"]
    step = final.get("interval_minutes")
    rows = [f"{'horizon':>8} {'MAE':>8} {'RMSE':>8} {'MAPE%':>8}   (masked)"]
    for h in (3, 6, 12):
        if f"masked_mae_h{h}" in t:
            when = f"{h * step:g}min" if step else f"{h} steps"
            rows.append(f"{when:>9} {t[f'masked_mae_h{h}']:8.3f} {t[f'masked_rmse_h{h}']:8.3f}"
                        f" {100 * t[f'masked_mape_h{h}']:8.2f}")
    rows.append(f"{'average':>8} {t['masked_mae']:8.3f} {t['masked_rmse']:8.3f} "
                f"{100 * t['masked_mape']:8.2f}")
    rows.append(f"paper protocol (unmasked, all horizons): RMSE {t['rmse']:.3f}  MAE {t['mae']:.3f}")
    return "\n".join(rows)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _main(cfg: DictConfig) -> None:
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    final, writer = run_experiment(cfg, run_dir=run_dir)
    print(format_table(final))
    print(f"best round {final['best_round']} of {final['rounds_run']}; "
          f"{final['bytes_total'] / 1e6:.1f} MB communicated; {final['seconds_total']:.1f} s")
    print(f"outputs: {writer.dir}")


def main() -> None:
    """Console-script entry."""
    _main()


if __name__ == "__main__":
    main()
