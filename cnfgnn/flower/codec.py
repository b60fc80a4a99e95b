"""Payload <-> Flower ``RecordDict``: the only place that knows how payloads are packed.

A payload (:mod:`cnfgnn.federation.protocol`) is a flat dict of numpy arrays, numpy scalars,
and Python ``int``/``float``/``str``/``bool``. Packed form:

* ``RecordDict["arrays"]``: an ``ArrayRecord``, one ``Array`` per ndarray or numpy scalar
  (``np.save`` format: dtype and shape are kept exactly);
* ``RecordDict["config"]``: a ``ConfigRecord`` with the Python scalars and strings;
* ``RecordDict["codec"]`` (only when needed): a ``ConfigRecord`` listing the keys that
  were numpy scalars (they come back as numpy scalars of the same dtype, not 0-d arrays).

``unpack(pack(p))`` equals ``p`` key by key, type by type. Imports only ``flwr.app``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from cnfgnn.federation import protocol as P

ARRAYS = "arrays"
CONFIG = "config"
CODEC = "codec"
NP_SCALARS = "np_scalars"


def pack(payload: P.Payload) -> RecordDict:
    """A payload as a ``RecordDict``: arrays in an ``ArrayRecord``, scalars in a
    ``ConfigRecord``."""
    arrays: dict[str, Array] = {}
    config: dict[str, Any] = {}
    np_scalars: list[str] = []
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"payload key {key!r}: object arrays cannot be sent")
            arrays[key] = Array(value)  # np.save keeps dtype, shape, 0-d too
        elif isinstance(value, np.generic):
            arrays[key] = Array(np.asarray(value))
            np_scalars.append(key)
        elif isinstance(value, (bool, int, float, str)):
            config[key] = value
        else:
            raise TypeError(f"payload key {key!r}: cannot send a {type(value).__name__}")
    rd = RecordDict()
    rd[ARRAYS] = ArrayRecord(arrays)
    rd[CONFIG] = ConfigRecord(config)
    if np_scalars:
        rd[CODEC] = ConfigRecord({NP_SCALARS: np_scalars})
    return rd


def unpack(content: RecordDict) -> P.Payload:
    """Inverse of :func:`pack`."""
    out: P.Payload = {}
    scalars = set(content[CODEC][NP_SCALARS]) if CODEC in content else set()
    if ARRAYS in content:
        for key, arr in content[ARRAYS].items():
            value = arr.numpy()
            out[key] = value[()] if key in scalars else value
    if CONFIG in content:
        out.update(dict(content[CONFIG].items()))
    return out


def wire_nbytes(content: RecordDict) -> int:
    """Bytes of a packed payload as Flower carries it (serialized arrays, keys, values).

    Uses the records' own ``count_bytes`` (no re-serialization), so it is cheap; message
    metadata and protobuf framing are not counted.
    """
    return int(sum(rec.count_bytes() for rec in content.values()))
