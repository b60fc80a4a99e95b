"""Logging for every cnfgnn module: ``logging.getLogger(__name__)`` under the ``cnfgnn`` logger.

A command (through :func:`cnfgnn.shell.console`) calls :func:`setup`: records at INFO (DEBUG
with ``-v``/``--verbose`` or ``hydra.verbose=true``) go to stderr, written through tqdm so
that progress bars stay whole. Every run directory gets the full log, DEBUG included, in
``<run_dir>/run.log`` (:func:`attach_run_log`, called by the run's writer).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT_LOGGER = "cnfgnn"
#: Loggers a command shows and a run log keeps: the package (the deployment launcher included).
LOGGERS = (ROOT_LOGGER,)
RUN_LOG = "run.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


class ConsoleHandler(logging.StreamHandler):
    """Writes records through ``tqdm.write`` (bars are cleared and redrawn around a line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            from tqdm import tqdm

            tqdm.write(msg, file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """``message`` for INFO, ``LEVEL name: message`` for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno == logging.INFO:
            return msg
        return f"{record.levelname.lower()} [{record.name}]: {msg}"


def _loggers() -> list[logging.Logger]:
    out = [logging.getLogger(name) for name in LOGGERS]
    for logger in out:
        logger.setLevel(logging.DEBUG)  # handlers choose what they show
    return out


def setup(verbose: bool = False, stream=None) -> logging.Logger:
    """Console logging of the ``cnfgnn`` logger (idempotent: one console handler).

    Args:
        verbose: show DEBUG records on the console too.
        stream: where to write (default: ``sys.stderr`` at each call).
    """
    loggers = _loggers()
    for logger in loggers:
        handler = next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)
        if handler is None:
            handler = ConsoleHandler(stream or sys.stderr)
            handler.setFormatter(_ConsoleFormatter("%(message)s"))
            logger.addHandler(handler)
        elif stream is not None:
            handler.setStream(stream)
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False  # one console line per record, whoever configured the root
    return loggers[0]


def has_console() -> bool:
    """True when :func:`setup` installed the console handler (or the root has handlers)."""
    logger = logging.getLogger(ROOT_LOGGER)
    return any(isinstance(h, ConsoleHandler) for h in logger.handlers) or bool(
        logging.getLogger().handlers
    )


def attach_run_log(run_dir: str | Path) -> Path:
    """Send every ``cnfgnn`` record (DEBUG up) to ``<run_dir>/run.log`` (appended: a resumed
    run continues its log). Replaces the previous run's file handler in this process."""
    path = Path(run_dir) / RUN_LOG
    loggers = _loggers()
    current = [h for h in loggers[0].handlers if getattr(h, "_cnfgnn_run_log", False)]
    if current and Path(current[0].baseFilename) == path.resolve():
        return path
    detach_run_log()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler._cnfgnn_run_log = True  # type: ignore[attr-defined]
    for logger in loggers:
        logger.addHandler(handler)
    return path


def detach_run_log() -> None:
    """Close the current run's log file (the API does it when a run ends)."""
    for logger in (logging.getLogger(name) for name in LOGGERS):
        for h in [h for h in logger.handlers if getattr(h, "_cnfgnn_run_log", False)]:
            logger.removeHandler(h)
            h.close()
