"""Result rows (dicts) as a CSV file and a markdown table: the one formatter of the sweep and
bench commands' outputs (``mean ± std`` where a row carries ``<key>_std``), and the one
``mean ± std`` statistic of the report and the bench (:func:`mean_std`)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def mean_std(values: Sequence[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the values that are not None; the std
    is None for a single value, both are None for none."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return None, None
    mean = sum(x) / len(x)
    if len(x) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits (``inf`` as such), None as empty."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def cell(row: dict[str, Any], key: str) -> str:
    """``mean ± std`` where ``row`` has a ``<key>_std`` that is not None, else the value."""
    std = row.get(f"{key}_std")
    return fmt(row.get(key)) if std is None else f"{fmt(row.get(key))} ± {fmt(std)}"


def markdown(rows: Sequence[dict[str, Any]], shown: Sequence[str]) -> list[str]:
    """The lines of a markdown table of ``shown`` columns, one line per row."""
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    return lines + ["| " + " | ".join(cell(r, k) for k in shown) + " |" for r in rows]


def write_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: Path) -> Path:
    """``rows`` as CSV with the columns ``keys`` (a missing value: empty)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    return path
