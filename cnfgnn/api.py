"""The Python API: compose a config, train, forecast and compare from a notebook or script.

Example (see ``docs/api.md``)::

    import cnfgnn

    cfg = cnfgnn.compose(["experiment=synthetic_cnfgnn", "federation.rounds=2"])
    run = cnfgnn.train(cfg)                 # a Run: run.dir, run.final, run.metrics
    run.metrics[["round", "train_loss", "val_rmse"]]
    df = cnfgnn.forecast(run.dir, at="2024-01-03 07:30")
    table = cnfgnn.compare(["cnfgnn", "gru_local"], ["federation.rounds=2"], budget_epochs=2)

Everything runs in this process with the same code as the commands (``cnfgnn``,
``cnfgnn-forecast``, ``cnfgnn-compare``) and writes the same run directories.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

__all__ = ["Run", "compare", "compose", "forecast", "load_run", "run_experiment", "train"]

log = logging.getLogger(__name__)


def run_experiment(
    cfg: Any,
    run_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    engine_wrapper: Callable[[Any], Any] | None = None,
) -> tuple[dict, Any]:
    """The experiment driver: ``(final metrics, run writer)`` (the ``cnfgnn`` command's).

    The one place the API and the CLI import the driver from.
    """
    from cnfgnn.experiment import run_experiment as driver

    kwargs: dict[str, Any] = {"engine_wrapper": engine_wrapper}
    if progress is not None:
        kwargs["progress"] = progress
    return driver(cfg, run_dir=run_dir, **kwargs)


@dataclass(frozen=True)
class Run:
    """A finished run directory.

    Attributes:
        dir: ``outputs/<name>/<timestamp>_<seed>/``.
        final: ``final.json``: test metrics (``final["test"]["rmse"]`` is the paper's
            number: unmasked RMSE over all horizons), best round, bytes, seconds.
    """

    dir: Path
    final: dict[str, Any]

    @property
    def metrics(self) -> pd.DataFrame:
        """``metrics.jsonl`` as a frame: one row per round; nested fields are dotted
        columns (``seconds.local``, ``bytes.split.up_tensor``)."""
        import pandas as pd

        path = self.dir / "metrics.jsonl"
        rows = (
            [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if path.exists()
            else []
        )
        return pd.json_normalize(rows, sep=".")

    @property
    def config(self) -> DictConfig:
        """The resolved config the run was trained with (``config.yaml``)."""
        from omegaconf import OmegaConf

        return OmegaConf.load(self.dir / "config.yaml")  # type: ignore[return-value]

    def __repr__(self) -> str:
        test = self.final.get("test", {})
        rmse = test.get("rmse")
        shown = f", test RMSE {rmse:.3f}" if isinstance(rmse, float) else ""
        return f"Run({str(self.dir)!r}{shown})"


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """``conf/`` composed with Hydra ``overrides``, as ``cnfgnn OVERRIDES...`` would.

    Raises:
        cnfgnn.shell.UsageError: a misspelt key or group option (the message names the close
            matches).
    """
    from cnfgnn.shell import compose as shell_compose

    return shell_compose(list(overrides), config_name)


def load_run(path: str | Path) -> Run:
    """The :class:`Run` of an existing run directory (it holds ``final.json``)."""
    run_dir = Path(path)
    final_path = run_dir / "final.json"
    if not final_path.is_file():
        from cnfgnn.data.errors import bad_input

        raise bad_input(
            run_dir,
            "no final.json (not a finished run)",
            "pass a run directory written by cnfgnn or cnfgnn.train",
        )
    return Run(run_dir, json.loads(final_path.read_text()))


def train(
    cfg: DictConfig | Sequence[str] | None = None,
    *,
    run_dir: str | Path | None = None,
    progress: bool | str | None = None,
) -> Run:
    """Train and test one experiment; returns its :class:`Run`.

    Args:
        cfg: a composed config (:func:`compose`), or a list of overrides to compose.
        run_dir: where to write (default: ``<output_root>/<name>/<timestamp>_<seed>``);
            an existing run with ``resume=true`` continues.
        progress: bars per phase: ``True``/``False``/``"auto"`` (default: ``cfg.progress``).
    """
    from omegaconf import DictConfig as _DictConfig
    from omegaconf import OmegaConf

    from cnfgnn import logs

    if not isinstance(cfg, _DictConfig):
        cfg = compose(list(cfg or ()))
    if progress is not None:
        cfg = OmegaConf.merge(cfg, {"progress": progress})
    if not logs.has_console():  # a plain session: show the run's lines on stderr
        logs.setup()
    try:
        final, writer = run_experiment(cfg, run_dir=run_dir)
    finally:
        logs.detach_run_log()
    return Run(Path(writer.dir), final)


def forecast(
    run: Run | str | Path, at: Any = None, *, overrides: Sequence[str] = ()
) -> pd.DataFrame:
    """Forecast the next ``out_steps`` for every sensor from the window ending at ``at``.

    Args:
        run: a :class:`Run` or its directory (or its ``checkpoint.pt``).
        at: issue time (a string such as ``"2012-03-07 07:30"`` or a timestamp; default:
            the data's last step).
        overrides: ``cnfgnn-forecast``'s config overrides (``engine=simulation``,
            ``device=cpu``, ``federation.nodes_per_client=K``, ...).

    Returns:
        The tidy frame of ``cnfgnn-forecast``'s CSV: ``sensor_id, timestamp, horizon,
        forecast, observed`` (observed: the data's value where it is known, else NaN).
    """
    import numpy as np

    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.federation.inference import load_trained
    from cnfgnn.forecast import outputs as O
    from cnfgnn.forecast import request as R

    run_dir, ckpt = R.locate_run(run.dir if isinstance(run, Run) else run)
    cfg, changed = R.run_config(run_dir, list(overrides))
    trained = load_trained(ckpt, cfg)
    data = load_dataset(cfg.dataset)
    R.check_network(data, trained, cfg, changed, run_dir)
    when = None if at is None else str(at)
    ends = np.asarray([R.step_index(data, when, int(cfg.dataset.in_steps))], np.int64)
    result, _ = R.run_forecast(cfg, data, trained, ends, run_dir / "forecast", log.info)
    return O.tidy(result, data)


def compare(
    methods: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    *,
    budget_epochs: int | None = None,
    out: str | Path | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """CNFGNN and baselines on one budget (``cnfgnn-compare``); returns ``comparison.csv``.

    Args:
        methods: names of ``conf/compare/default.yaml``'s ``methods`` (default: its
            ``run`` list; ``["all"]`` for every one).
        overrides: Hydra overrides given to every run (``dataset=los_loop``, ...).
        budget_epochs: local epochs per node for every method.
        out: the comparison directory (a method already finished there is kept).
        force: rerun methods that finished before.

    Raises:
        RuntimeError: a method failed (its ``compare.log`` says why).
    """
    import pandas as pd

    from cnfgnn import compare as C

    args = list(overrides)
    if methods is not None:
        args.append(f"compare.run=[{','.join(methods)}]")
    if budget_epochs is not None:
        args.append(f"compare.budget_epochs={int(budget_epochs)}")
    if out is not None:
        args.append(f"compare.out={out}")
    if force:
        args.append("compare.force=true")
    out_dir, _, _, failed = C.run(args)
    if failed:
        raise RuntimeError(f"method(s) {failed} failed; see {out_dir}/<method>/compare.log")
    return pd.read_csv(out_dir / "comparison.csv")
