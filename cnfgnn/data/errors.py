"""Errors raised for bad input data, with messages that name the file, the problem and the fix."""

from __future__ import annotations

from os import PathLike
from pathlib import Path


class DataError(ValueError):
    """Bad input data.

    The message always says which file (or which dataset) is wrong, what is wrong with it and
    how to fix it, e.g. ``data/adj.csv: adjacency is 206 x 207, not square. Fix: write an
    N x N matrix, one row and one column per sensor.``
    """


def bad_input(source: str | PathLike[str], problem: str, fix: str) -> DataError:
    """Build a :class:`DataError` with the standard three-part message.

    Args:
        source: the file (or dataset name) the problem is in.
        problem: what is wrong, with the offending values where useful.
        fix: what the user should do about it.

    Returns:
        The error, ready to ``raise``.
    """
    return DataError(f"{source}: {problem}. Fix: {fix}")


def require_file(path: str | PathLike[str], what: str, setting: str | None = None) -> Path:
    """Return ``path`` as a :class:`Path`, or raise a :class:`DataError` when it is not a file.

    Args:
        path: the expected file.
        what: a few words saying what the file holds (``"speed series (HDF5)"``).
        setting: the config key that sets this path, named in the fix.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    where = f" (resolved against the working directory {Path.cwd()})" if not p.is_absolute() else ""
    problem = f"{what} not found{where}" if not p.exists() else f"{what} is not a regular file"
    hint = f"set {setting}=PATH" if setting else "pass the right path"
    raise bad_input(p, problem, f"{hint}; see data/README.md for the expected files")
