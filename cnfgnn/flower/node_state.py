"""A Flower client's state between messages, on its node's disk, kept in parts.

Flower gives a node's messages to any Ray actor in a simulation and a fresh process in a
deployment, so a client's mutable state (:meth:`NodeWorker.state_dict`: model, optimizer,
scaler, ``h_c``, ``h_G``, round...) lives on the node's disk between messages. Each
top-level entry of that state is a file of its own, named by the version that wrote it:

.. code-block:: text

    <state-root>/<run_id>/client_<partition-id>/
        state.pt              the manifest: {"version": v, "parts": {entry: version}}
        <entry>.<version>.pt  one entry of NodeWorker.state_dict()

After a message that changed the worker, :func:`save` writes only the entries that differ
from the ones this process last saved or loaded (local training: the model; an encode:
``h_c``; an embed: ``h_G``), then replaces the manifest (an atomic rename, so a crash leaves
the last complete state), then deletes the files it superseded. A process that holds an
older version of the worker (:class:`Held`) reads only the entries written since
(:func:`load`). Writing the whole state after every message, and reading it whole on every
change of actor, cost 3-6 ms per message at one sensor per client
(docs/results/2026-12-04-flower-dispatch.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn.federation.node import NodeWorker

MANIFEST = "state.pt"
VERSION = "version"
PARTS = "parts"


@dataclass
class Held:
    """A worker held in a process's memory at ``version``, with the state it last saved
    or loaded (``snapshot``, a copy) and the version of each entry of it (``parts``)."""

    version: int
    worker: NodeWorker
    snapshot: dict[str, Any]
    parts: dict[str, int]


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


def _part(directory: Path, entry: str, version: int) -> Path:
    return directory / f"{entry}.{version}.pt"


def _write(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(directory: Path, held: Held, version: int) -> Held:
    """Persist ``held.worker`` as ``version``: the entries that differ from ``held``'s
    snapshot (all of them for a new worker, whose snapshot is empty), then the manifest.
    Returns what this process now holds."""
    directory.mkdir(parents=True, exist_ok=True)
    state = held.worker.state_dict()
    parts = dict(held.parts)
    superseded = []
    for entry, value in state.items():
        if entry in parts and entry in held.snapshot and same(value, held.snapshot[entry]):
            continue
        _write(_part(directory, entry, version), value)
        if entry in parts and parts[entry] != version:
            superseded.append(_part(directory, entry, parts[entry]))
        parts[entry] = version
    _write(directory / MANIFEST, {VERSION: version, PARTS: parts})
    for path in superseded:
        path.unlink(missing_ok=True)
    return Held(version, held.worker, state, parts)


def manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of the state on disk (``version``, ``parts``), or None if there is none."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    return dict(torch.load(path, map_location="cpu", weights_only=False))


def load(
    directory: Path, stored: dict[str, Any], worker: NodeWorker, held: Held | None = None
) -> Held:
    """Restore the state that the manifest ``stored`` names into ``worker``: the entries
    that ``held`` (an older version of the same client, in this process) does not hold
    already, read from their files. Returns what this process now holds.

    Raises:
        FileNotFoundError: an entry's file is missing.
    """
    parts = {str(k): int(v) for k, v in stored[PARTS].items()}
    state = {}
    for entry, version in parts.items():
        if held is not None and held.parts.get(entry) == version and entry in held.snapshot:
            state[entry] = held.snapshot[entry]
        else:
            state[entry] = torch.load(
                _part(directory, entry, version), map_location=worker.device, weights_only=False
            )
    worker.load_state_dict(state)
    return Held(int(stored[VERSION]), worker, worker.state_dict(), parts)
