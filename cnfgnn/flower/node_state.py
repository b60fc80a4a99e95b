"""A Flower client's state between messages, on its node's disk: one file per version.

Flower gives a node's messages to any Ray actor in a simulation and a fresh process in a
deployment, so a client's mutable state (:meth:`NodeWorker.state_dict`: model, optimizer,
scaler, ``h_c``, ``h_G``, round...) lives on the node's disk between messages:

.. code-block:: text

    <state-root>/<run_id>/client_<partition-id>/
        v<version>.pt   {"version": v, "parts": {entry: version}, "entries": {entry: value}}

After a message that changed the worker, :func:`save` writes one new file, ``v<version>.pt``:
the top-level entries of the state that differ from the ones this process last saved or
loaded (local training: the model; an encode: ``h_c``; a split step: its pending batch), and
``parts``, which names for every entry the version whose file holds its current value. The
file is written under a temporary name and renamed (a crash leaves the last complete
version); then the files that no entry refers to any more are deleted. The newest file on
disk is the state (:func:`latest`); a process that holds an older version of the worker
(:class:`Held`) reads only the files of the entries written since (:func:`load`).

One file per save, because on this project's ext4 disk every file costs 0.2-0.35 ms to write
whatever its size (a rename over an existing file forces its data out first), and a client
of one sensor saves after five messages a round: a file per entry plus a manifest cost
2.5 ms per save (docs/results/2026-12-05-flower-warm-up-and-state-files.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn.federation.node import NodeWorker

VERSION = "version"
PARTS = "parts"
ENTRIES = "entries"
_FILE = re.compile(r"v(\d+)\.pt")
LEGACY = "state.pt"  # the manifest of the layout before 2026-12-05 (a file per entry)


@dataclass
class Held:
    """A worker held in a process's memory at ``version``, with the state it last saved
    or loaded (``snapshot``, a copy) and the version of each entry of it (``parts``)."""

    version: int
    worker: NodeWorker
    snapshot: dict[str, Any]
    parts: dict[str, int]


@dataclass
class Stored:
    """One version's file: its ``parts`` (entry -> version of the file holding it) and the
    ``entries`` written at that version."""

    version: int
    parts: dict[str, int]
    entries: dict[str, Any]


def same(a: Any, b: Any) -> bool:
    """Whether two state entries are equal (tensors and arrays exactly; NaN never equals,
    so an entry holding one is written again)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and bool(np.array_equal(a, b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and bool(a == b)


def path_of(directory: Path, version: int) -> Path:
    """The file of ``version``."""
    return directory / f"v{version}.pt"


def _write(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> Stored:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    parts = {str(k): int(v) for k, v in obj[PARTS].items()}
    return Stored(int(obj[VERSION]), parts, dict(obj[ENTRIES]))


def save(directory: Path, held: Held, version: int) -> Held:
    """Persist ``held.worker`` as ``version``: one file with the entries that differ from
    ``held``'s snapshot (all of them for a new worker, whose snapshot is empty), then delete
    the files of ``held``'s versions that no entry refers to any more. Returns what this
    process now holds."""
    directory.mkdir(parents=True, exist_ok=True)
    state = held.worker.state_dict()
    parts = dict(held.parts)
    changed = {
        entry: value
        for entry, value in state.items()
        if not (entry in parts and entry in held.snapshot and same(value, held.snapshot[entry]))
    }
    parts.update(dict.fromkeys(changed, version))
    _write(path_of(directory, version), {VERSION: version, PARTS: parts, ENTRIES: changed})
    live = set(parts.values())
    for old in set(held.parts.values()) | {held.version}:
        if old != version and old not in live:
            path_of(directory, old).unlink(missing_ok=True)
    return Held(version, held.worker, state, parts)


def latest(directory: Path) -> Stored | None:
    """The newest version on disk, or None if there is none.

    Raises:
        RuntimeError: the directory holds state in the layout of an earlier cnfgnn.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    if LEGACY in names:
        raise RuntimeError(
            f"{directory} holds client state written by an earlier cnfgnn ({LEGACY}: a file "
            "per entry); this one keeps a file per version (v<N>.pt) and cannot continue it. "
            "Fix: start a new run, or remove that directory"
        )
    versions = [int(m.group(1)) for name in names if (m := _FILE.fullmatch(name))]
    return _read(path_of(directory, max(versions))) if versions else None


def load(directory: Path, stored: Stored, worker: NodeWorker, held: Held | None = None) -> Held:
    """Restore the version ``stored`` into ``worker``: the entries that ``held`` (an older
    version of the same client, in this process) does not hold already, from ``stored``
    itself or the files that its ``parts`` name. Returns what this process now holds.

    Raises:
        FileNotFoundError: a file that ``parts`` names is missing.
    """
    files = {stored.version: stored.entries}
    state = {}
    for entry, version in stored.parts.items():
        if held is not None and held.parts.get(entry) == version and entry in held.snapshot:
            state[entry] = held.snapshot[entry]
            continue
        if version not in files:
            files[version] = _read(path_of(directory, version)).entries
        state[entry] = files[version][entry]
    worker.load_state_dict(state)
    return Held(stored.version, worker, worker.state_dict(), dict(stored.parts))
