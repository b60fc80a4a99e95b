"""Validation of every CNFGNN message: requests on the node, replies on the server.

The schemas come from the message table ``protocol.MESSAGES``: each row names its request
schema (a key of :data:`REQUEST_SCHEMAS`), its reply schema (:data:`REPLY_SCHEMAS`) and its
preconditions (``needs_model``, ``needs_config``). A schema is a small function of the payload
and the limits that returns the specs of every key allowed; the generic rules below (keys,
dtypes, shapes, ranges, finiteness, hosted sensors) apply the same way to every type. A new
message type with an existing payload layout needs no edit here. Checked in one place:

* :func:`check_request` (node side, before :meth:`NodeWorker.handle` dispatches): known
  message type; required keys present, no unknown keys; integers where integers belong,
  floats finite; shapes against the client's hosted node count ``K``, the model sizes
  (``L`` layers, ``H`` hidden), the window counts of each split and the batch that was
  sent; indices (window positions, window ends) in range; known split names and actions;
  ``NODES``, when sent, exactly the sensors the client hosts; and the order of messages
  (``configure`` before anything that reads the series, ``encode`` before a split step).
* :func:`check_reply` (server side, on every reply the engine hands back): the same for
  what came back, against what was asked (``K`` of that client, the batch, the split,
  the report windows and sensors), plus a magnitude bound ``federation.reply_max_abs`` on model
  weights, temporal encodings, gradients and forecasts, non-negative sums and counts no
  larger than the windows they count. A client whose reply fails is treated exactly like
  a client that did not answer: it is left out of that phase (see ``Orchestrator._send``).

Both raise :class:`MalformedMessage` naming the message type, the key, what was expected
and what came. They return a normalised copy of the payload (model tensors as contiguous
float32, sums as float64, indices as int64), so the handlers never see another dtype.
Plain Python and numpy: no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnfgnn.federation import protocol as P

#: Used only when a config has no ``federation.reply_max_abs`` (runs written before it existed).
DEFAULT_REPLY_MAX_ABS = 1e6
#: Largest round or step counter a message may carry (far beyond any real run; keeps the
#: counter-based RNG keys and the scheduled-sampling exponent in range).
MAX_COUNTER = 2**40
#: Flower error-reply code of a request the ClientApp refused as malformed.
MALFORMED_CODE = 4000
#: Evaluation sums (``err.<name>``) whose name ends so are counts: at most one per window.
_COUNT_SUFFIX = "count"


class MalformedMessage(ValueError):
    """A request or reply that does not match its message type's schema.

    The message names the message type, the key, what was expected and what came, e.g.
    ``train.split: 'h_g': expected float array of shape (8, 2, 1, 64), got (8, 3, 1, 64)``.
    """


def _bad(mtype: str, key: str, expected: str, got: str) -> MalformedMessage:
    return MalformedMessage(f"{mtype}: {key!r}: expected {expected}, got {got}")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


# ---------------------------------------------------------------------- field kinds
@dataclass(frozen=True)
class Floats:
    """A float array: ``shape`` entries are exact sizes (None: any), finite values.

    Attributes:
        shape: expected shape; ``shapes`` alternatives (e.g. ``()`` or ``(K,)``).
        dtype: the dtype the value is cast to once valid.
        min_value: inclusive lower bound (e.g. 0 for sums of squares), or None.
        positive: every value must be > 0 (standard deviations).
        max_abs: bound on ``|value|`` (absurd magnitudes), or None.
        max_value: inclusive upper bound (counts), or None.
    """

    shape: tuple[int | None, ...] | None = None
    dtype: Any = np.float32
    min_value: float | None = None
    positive: bool = False
    max_abs: float | None = None
    max_value: float | None = None
    shapes: tuple[tuple[int | None, ...], ...] = ()


@dataclass(frozen=True)
class Ints:
    """An int array (``shape`` as :class:`Floats`) with values in ``[lo, hi]``."""

    shape: tuple[int | None, ...] | None = None
    lo: int | None = None
    hi: int | None = None
    min_len: int = 0
    max_len: int | None = None
    hint: str = ""


@dataclass(frozen=True)
class Int:
    """A scalar integer (Python ``int`` or numpy integer, not bool) in ``[lo, hi]``."""

    lo: int = 0
    hi: int = MAX_COUNTER


@dataclass(frozen=True)
class Num:
    """A finite scalar number (int or float, not bool) in ``[lo, hi]``."""

    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True)
class Flag:
    """A boolean (Python or numpy bool)."""


@dataclass(frozen=True)
class Str:
    """A string; ``choices`` restricts it (None: any string)."""

    choices: tuple[str, ...] | None = None


Spec = Floats | Ints | Int | Num | Flag | Str


def _shape_ok(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _fmt_shape(want: tuple[int | None, ...]) -> str:
    inner = ", ".join("*" if w is None else str(w) for w in want)
    return f"({inner},)" if len(want) == 1 else f"({inner})"


def _check_value(mtype: str, key: str, value: Any, spec: Spec) -> Any:
    """One value against its spec; returns the normalised value."""
    if isinstance(spec, Str):
        if not isinstance(value, str):
            raise _bad(mtype, key, "a string", _describe(value))
        if spec.choices is not None and value not in spec.choices:
            raise _bad(mtype, key, f"one of {list(spec.choices)} (unknown value)", repr(value[:60]))
        return value
    if isinstance(spec, (Num, Flag)) and isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(spec, Flag):
        if not isinstance(value, (bool, np.bool_)):
            raise _bad(mtype, key, "a boolean", _describe(value))
        return bool(value)
    if isinstance(spec, Num):
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise _bad(mtype, key, "a number", _describe(value))
        v = float(value)
        if not (math.isfinite(v) and spec.lo <= v <= spec.hi):
            raise _bad(mtype, key, f"a finite number in [{spec.lo:g}, {spec.hi:g}]", repr(v))
        return v
    if isinstance(spec, Int):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise _bad(mtype, key, "an integer", _describe(value))
        if not spec.lo <= int(value) <= spec.hi:
            raise _bad(mtype, key, f"an integer in [{spec.lo}, {spec.hi}]", str(int(value)))
        return int(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
        value = np.asarray(value)  # a numpy scalar (the codec keeps them): a 0-d array
    if not isinstance(value, np.ndarray):
        raise _bad(mtype, key, "a numpy array", _describe(value))
    if isinstance(spec, Ints):
        if value.dtype.kind not in "iu":
            raise _bad(mtype, key, "an integer array", _describe(value))
        if spec.shape is not None and not _shape_ok(value.shape, spec.shape):
            raise _bad(mtype, key, f"int array of shape {_fmt_shape(spec.shape)}", str(value.shape))
        if value.size < spec.min_len or (spec.max_len is not None and value.size > spec.max_len):
            hi = "" if spec.max_len is None else f" and at most {spec.max_len}"
            raise _bad(mtype, key, f"at least {spec.min_len}{hi} entries", str(value.size))
        if value.dtype.kind == "u" and value.size and int(value.max()) > np.iinfo(np.int64).max:
            raise _bad(mtype, key, "values that fit int64", str(int(value.max())))
        out = np.ascontiguousarray(value, dtype=np.int64)
        low = out < spec.lo if spec.lo is not None else np.zeros(out.shape, bool)
        high = out > spec.hi if spec.hi is not None else np.zeros(out.shape, bool)
        if low.any() or high.any():
            bad = out[low | high]
            raise _bad(
                mtype,
                key,
                f"values in [{spec.lo}, {spec.hi}]{spec.hint}",
                f"{bad[:5].tolist()} out of range",
            )
        return out
    # Floats
    if value.dtype.kind != "f":
        raise _bad(mtype, key, "a float array", _describe(value))
    alternatives = spec.shapes or ((spec.shape,) if spec.shape is not None else ())
    if alternatives and not any(_shape_ok(value.shape, a) for a in alternatives):
        want = " or ".join(_fmt_shape(a) for a in alternatives)
        raise _bad(mtype, key, f"float array of shape {want}", str(value.shape))
    with np.errstate(all="ignore"):
        finite = np.isfinite(value)
        if not finite.all():
            raise _bad(mtype, key, "finite values", f"{int((~finite).sum())} NaN/inf")
        out = np.ascontiguousarray(value, dtype=spec.dtype)
        narrowed = out.dtype.itemsize < value.dtype.itemsize
        if narrowed and not np.isfinite(out).all():  # float64 beyond float32's range
            raise _bad(mtype, key, f"values that fit {np.dtype(spec.dtype).name}", "overflow")
        if out.size:
            if spec.max_abs is not None:
                # max |value| from the extremes: no array of the payload's size is allocated
                biggest = max(float(out.max()), -float(out.min()))
                if biggest > spec.max_abs:
                    raise _bad(
                        mtype,
                        key,
                        f"|values| <= {spec.max_abs:g} (federation.reply_max_abs)",
                        f"max |value| {biggest:.3g}",
                    )
            if spec.min_value is not None and float(out.min()) < spec.min_value:
                raise _bad(
                    mtype, key, f"values >= {spec.min_value:g}", f"min {float(out.min()):.3g}"
                )
            if spec.positive and float(out.min()) <= 0:
                raise _bad(mtype, key, "values > 0", f"min {float(out.min()):.3g}")
            if spec.max_value is not None and float(out.max()) > spec.max_value:
                raise _bad(
                    mtype, key, f"values <= {spec.max_value:g}", f"max {float(out.max()):.3g}"
                )
    return out


def _check_fields(
    mtype: str,
    payload: Any,
    required: Mapping[str, Spec],
    optional: Mapping[str, Spec] | None = None,
) -> dict[str, Any]:
    """Every required key present, no unknown key, each value valid; normalised copy."""
    if not isinstance(payload, Mapping):
        raise _bad(mtype, "<payload>", "a dict of named values", _describe(payload))
    optional = optional or {}
    for key in payload:
        if not isinstance(key, str):
            raise _bad(mtype, repr(key), "string keys", type(key).__name__)
        if key not in required and key not in optional:
            known = sorted(set(required) | set(optional))
            raise _bad(
                mtype,
                key,
                f"only the keys {known[:12]}{' ...' if len(known) > 12 else ''}",
                "an unknown key",
            )
    out: dict[str, Any] = {}
    for key, spec in required.items():
        if key not in payload:
            raise _bad(mtype, key, "this key (required)", "nothing")
        out[key] = _check_value(mtype, key, payload[key], spec)
    for key, spec in optional.items():
        if key in payload:
            out[key] = _check_value(mtype, key, payload[key], spec)
    return out


def _weights(
    shapes: Mapping[str, tuple[int, ...]] | None,
    prefix: str,
    lead: tuple[int | None, ...] = (),
    max_abs: float | None = None,
) -> dict[str, Spec]:
    """Specs of a full set of node-model tensors ``prefix<name>`` -> ``[*lead, *shape]``."""
    if not shapes:
        return {}
    return {prefix + n: Floats(lead + tuple(s), max_abs=max_abs) for n, s in shapes.items()}


def _all_or_none(mtype: str, payload: Mapping[str, Any], keys: list[str], what: str) -> bool:
    """True when every key is present, False when none is; a partial set is malformed."""
    present = [k for k in keys if k in payload]
    if present and len(present) != len(keys):
        missing = sorted(set(keys) - set(present))
        raise _bad(
            mtype,
            missing[0],
            f"the full {what} ({len(keys)} keys)",
            f"{len(present)} of them; missing {missing[:4]}",
        )
    return bool(present)


# ---------------------------------------------------------------------- requests (node side)
@dataclass
class NodeLimits:
    """What a node knows to check a request against.

    Attributes:
        nodes: ``[K]`` global indices of the hosted sensors.
        windows: windows per split (``train``/``val``/``test``).
        num_steps: ``T``, time steps of the local series.
        in_steps: input window length.
        layers: node-model GRU layers ``L``.
        hidden: hidden size ``H`` (also the size of ``h_G``).
        graph_embedding: whether the node model decodes with ``h_G``.
        weight_shapes: one node's model tensors, ``name -> shape`` (None: no model).
        configured: ``configure`` has been answered (scaler and inputs set).
        encoded: windows of ``h_c`` the node holds per split (from its last ``encode``).
        pending_batch: windows of the pending split-learning batch, or None.
    """

    nodes: np.ndarray
    windows: dict[str, int]
    num_steps: int
    in_steps: int
    layers: int
    hidden: int
    graph_embedding: bool
    weight_shapes: dict[str, tuple[int, ...]] | None
    configured: bool = False
    encoded: dict[str, int] = field(default_factory=dict)
    pending_batch: int | None = None

    @property
    def k(self) -> int:
        return len(self.nodes)


def _need(mtype: str, ok: bool, what: str) -> None:
    if not ok:
        raise MalformedMessage(f"{mtype}: refused: {what}")


def _batch(lim: NodeLimits) -> Ints:
    s = lim.windows[P.TRAIN]
    return Ints(
        (None,),
        lo=0,
        hi=s - 1,
        min_len=1,
        max_len=s,
        hint=f" (positions among the {s} training windows)",
    )


#: A request schema: (message type, payload, limits) -> (required, optional) specs. The
#: optional ``NODES`` check is added to every one. Preconditions that are a property of the
#: message (node model, ``configure`` first) are flags of its row in ``protocol.MESSAGES``.
RequestSchema = Callable[
    [str, Mapping[str, Any], NodeLimits], tuple[dict[str, Spec], dict[str, Spec]]
]


def _req_empty(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """Nothing but the optional ``NODES`` (``hello``, ``stats``)."""
    return {}, {}


def _req_configure(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """The global scaler (both or neither), the node model, ``OWN_MODEL``."""
    k = lim.k
    opt: dict[str, Spec] = {}
    if _all_or_none(mtype, payload, [P.SCALER_MEAN, P.SCALER_STD], "global scaler"):
        opt[P.SCALER_MEAN] = Floats(shapes=((), (k,)), dtype=np.float64)
        opt[P.SCALER_STD] = Floats(shapes=((), (k,)), dtype=np.float64, positive=True)
    opt |= _weights(lim.weight_shapes, P.WEIGHTS_PREFIX)
    opt[P.OWN_MODEL] = Flag()  # per-node methods: load the model kept on the node
    return {}, opt


def _req_local_train(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """Counters, the node model, the DP node count and the FMTL neighbour set."""
    k = lim.k
    req: dict[str, Spec] = {P.ROUND: Int(), P.STEP: Int()}
    opt = _weights(lim.weight_shapes, P.WEIGHTS_PREFIX)
    opt[P.DP_NODES] = Int(lo=1)  # privacy=dp: N, the nodes asked (node-side FedAvg noise)
    nbr = _weights(lim.weight_shapes, P.NBR_PREFIX)
    if _all_or_none(mtype, payload, list(nbr) + [P.NBR_WEIGHT], "FMTL neighbour set"):
        w = payload[P.NBR_WEIGHT]  # [K, M]: M >= 1 neighbours
        m = w.shape[1] if isinstance(w, np.ndarray) and w.ndim == 2 and w.shape[1] > 0 else -1
        opt[P.NBR_WEIGHT] = Floats((k, m), dtype=np.float64, min_value=0.0)
        opt |= _weights(lim.weight_shapes, P.NBR_PREFIX, lead=(m,))
    return req, opt


def _req_encode(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """A split name and, optionally, the node model."""
    return {P.SPLIT: Str(P.SPLITS)}, _weights(lim.weight_shapes, P.WEIGHTS_PREFIX)


def _req_batch_h_g(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """A training batch ``[B]``, its ``h_G`` ``[B, K, L, H]`` and the counters."""
    _need(mtype, lim.graph_embedding, "this node model has no graph embedding")
    req: dict[str, Spec] = {P.BATCH: _batch(lim), P.ROUND: Int(), P.STEP: Int()}
    b = len(payload[P.BATCH]) if isinstance(payload.get(P.BATCH), np.ndarray) else -1
    req[P.H_G] = Floats((b, lim.k, lim.layers, lim.hidden))
    return req, {}


def _req_split_step(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """As ``batch_h_g``, after an ``encode`` of the whole train split."""
    req, opt = _req_batch_h_g(mtype, payload, lim)
    _need(
        mtype,
        lim.encoded.get(P.TRAIN) == lim.windows[P.TRAIN],
        f"{mtype} before {P.ENCODE} of the train split",
    )
    return req, opt


def _req_embed(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """``h_G`` ``[S_train, K, L, H]`` for every training window."""
    _need(mtype, lim.graph_embedding, "this node model has no graph embedding")
    return {P.H_G: Floats((lim.windows[P.TRAIN], lim.k, lim.layers, lim.hidden))}, {}


def _req_evaluate(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """A split, its ``h_G`` (graph embedding), the node model, the report windows/sensors."""
    k = lim.k
    req: dict[str, Spec] = {P.SPLIT: Str(P.SPLITS)}
    split = payload.get(P.SPLIT)
    s = lim.windows.get(split, -1) if isinstance(split, str) else -1
    opt = _weights(lim.weight_shapes, P.WEIGHTS_PREFIX)
    opt[P.REPORT] = Ints((None,), lo=0, hi=s - 1, hint=f" (positions among the {s} windows)")
    opt[P.REPORT_NODES] = Ints((None,), lo=0, min_len=1, max_len=k)  # hosted: checked later
    opt[P.RELEASE] = Flag()
    if lim.graph_embedding:  # decode from the h_c this node sent up for the split
        _need(
            mtype,
            s < 0 or lim.encoded.get(str(split)) == s,
            f"h_G for the {split} split, but this node has not encoded it; send {P.ENCODE} first",
        )
        req[P.H_G] = Floats((s, k, lim.layers, lim.hidden))
    return req, opt


def _req_keep(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """``ACTION``: keep_best | restore_best."""
    return {P.ACTION: Str((P.KEEP_BEST, P.RESTORE_BEST))}, {}


def _req_batch(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """A training batch ``[B]`` (counters only with privacy on: they key the noise)."""
    return {P.BATCH: _batch(lim)}, {P.ROUND: Int(), P.STEP: Int()}


def _req_sl_backward(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """``dL/dh_c`` ``[B, K, L, H]`` of the pending split-learning batch."""
    _need(mtype, lim.pending_batch is not None, f"{mtype} without a pending {P.SL_DECODE}")
    return {P.GRAD_H_C: Floats((lim.pending_batch, lim.k, lim.layers, lim.hidden))}, {}


def _req_ends(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """Window ends ``[W]`` with a full input history, and an input-noise level."""
    lo, hi = lim.in_steps - 1, lim.num_steps - 1
    req: dict[str, Spec] = {
        P.ENDS: Ints(
            (None,), lo=lo, hi=hi, hint=f": a window needs {lim.in_steps} steps of history"
        )
    }
    return req, {P.NOISE: Num(0.0, 1e3)}  # input-noise level (robustness experiments)


def _req_ends_h_g(
    mtype: str, payload: Mapping[str, Any], lim: NodeLimits
) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """As ``ends``, plus ``h_G`` ``[W, K, L, H]`` when the node model decodes with it."""
    req, opt = _req_ends(mtype, payload, lim)
    if lim.graph_embedding:
        w = len(payload[P.ENDS]) if isinstance(payload.get(P.ENDS), np.ndarray) else -1
        req[P.H_G] = Floats((w, lim.k, lim.layers, lim.hidden))
    return req, opt


#: Request schemas by the name a row of ``protocol.MESSAGES`` gives in ``request``.
REQUEST_SCHEMAS: dict[str, RequestSchema] = {
    "empty": _req_empty,
    "configure": _req_configure,
    "local_train": _req_local_train,
    "encode": _req_encode,
    "split_step": _req_split_step,
    "batch_h_g": _req_batch_h_g,
    "embed": _req_embed,
    "evaluate": _req_evaluate,
    "keep": _req_keep,
    "batch": _req_batch,
    "sl_backward": _req_sl_backward,
    "ends": _req_ends,
    "ends_h_g": _req_ends_h_g,
}


def check_request(mtype: Any, payload: Any, lim: NodeLimits) -> P.Payload:
    """Check a request before the node handles it; returns the normalised payload.

    The schema is the one the message's row of ``protocol.MESSAGES`` names
    (:data:`REQUEST_SCHEMAS`), with the row's preconditions (node model, ``configure`` first).

    Raises:
        MalformedMessage: unknown message type, missing/unknown key, wrong type, dtype or
            shape, non-finite value, index out of range, sensors this client does not host,
            or a message that needs an earlier one (``configure``, ``encode``, ``sl_decode``).
    """
    row = P.message(mtype) if isinstance(mtype, str) else None
    if row is None:
        raise MalformedMessage(
            f"unknown message type {mtype!r}; expected one of {[m.name for m in P.MESSAGES]}"
        )
    if not isinstance(payload, Mapping):
        raise _bad(mtype, "<payload>", "a dict of named values", _describe(payload))
    w_keys = list(_weights(lim.weight_shapes, P.WEIGHTS_PREFIX))
    if any(key.startswith(P.WEIGHTS_PREFIX) for key in payload):
        _need(mtype, lim.weight_shapes is not None, "this node has no model to load weights into")
        _all_or_none(mtype, payload, w_keys, "node model")
    if row.needs_model:
        _need(mtype, lim.weight_shapes is not None, "this node holds data only, no node model")
    if row.needs_config:
        _need(
            mtype,
            lim.configured,
            f"{mtype} before {P.CONFIGURE}: send the scaler and the node model first",
        )
    req, extra = REQUEST_SCHEMAS[row.request](mtype, payload, lim)
    opt: dict[str, Spec] = {P.NODES: Ints((lim.k,), lo=0)}  # everywhere: who we should be
    opt |= extra
    out = _check_fields(mtype, payload, req, opt)
    if P.NODES in out and not np.array_equal(out[P.NODES], lim.nodes):
        raise _bad(
            mtype,
            P.NODES,
            f"the sensors this client hosts {lim.nodes[:8].tolist()}",
            f"{out[P.NODES][:8].tolist()} (sensors it does not host)",
        )
    if P.REPORT_NODES in out:
        rep = out[P.REPORT_NODES]
        if len(np.unique(rep)) != len(rep) or not np.isin(rep, lim.nodes).all():
            raise _bad(
                mtype,
                P.REPORT_NODES,
                f"distinct sensors this client hosts {lim.nodes[:8].tolist()}",
                f"{rep[:8].tolist()}",
            )
    return out


# ---------------------------------------------------------------------- replies (server side)
@dataclass
class ReplyLimits:
    """What the server checks a reply against.

    Attributes:
        num_graph_nodes: sensors in the server's graph (hosted indices must be below).
        windows: windows per split (after the handshake; empty before).
        layers, hidden, horizon: node-model sizes.
        weight_shapes: one node's model tensors, ``name -> shape``.
        max_abs: bound on |weights|, |h_c|, |dL/dh_G| and |forecasts|.
        weights_up: whether local training returns weights (not with aggregate=none).
        local_epochs, batch_size: bound the step counter a local-training reply may return.
        sum_keys: names of the evaluation sums (``err.<name>``).
    """

    num_graph_nodes: int
    windows: dict[str, int]
    layers: int
    hidden: int
    horizon: int
    weight_shapes: dict[str, tuple[int, ...]]
    max_abs: float = DEFAULT_REPLY_MAX_ABS
    weights_up: bool = True
    local_epochs: int = 1
    batch_size: int = 1
    sum_keys: tuple[str, ...] = ()


#: A reply schema: (message type, request sent, reply, K of the client or None, limits)
#: -> the specs of every key the reply must carry.
ReplySchema = Callable[[str, Mapping[str, Any], Any, int | None, ReplyLimits], dict[str, Spec]]


def _rep_empty(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """An empty reply (``configure``, ``embed``, ``keep``, ``sl_backward``)."""
    return {}


def _rep_hello(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """Hosted sensors (positions in the server's graph), their ids, windows per split."""
    n = lim.num_graph_nodes
    return {
        P.NODES: Ints(
            (None,),
            lo=0,
            hi=n - 1,
            min_len=1,
            hint=f" (positions in the server's graph of {n} sensors)",
        ),
        P.SENSOR_IDS: Str(),
        P.NUM_WINDOWS: Ints((3,), lo=0),
    }


def _rep_hello_optional(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    return {P.FIRST_START: Ints((3,), lo=-1)}


def _rep_stats(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """Per-node sums ``[K]`` of the training inputs."""
    return {
        P.STAT_SUM: Floats((kk,), np.float64),
        P.STAT_SUMSQ: Floats((kk,), np.float64, min_value=0.0),
        P.STAT_COUNT: Floats((kk,), np.float64, min_value=0.0),
    }


def _loss_sums(mtype: str, reply: Any, kk: int | None, cap: float) -> dict[str, Spec]:
    """Training-loss sums ``[K]``: both or neither (absent with privacy=dp)."""
    if _all_or_none(mtype, reply, [P.LOSS_SUM, P.LOSS_COUNT], "training-loss sums"):
        return {
            P.LOSS_SUM: Floats((kk,), np.float64, min_value=0.0),
            P.LOSS_COUNT: Floats((kk,), np.float64, min_value=0.0, max_value=cap),
        }
    return {}


def _rep_local_train(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """Weights ``[K, ...]`` (unless aggregate=none), examples, the step counter, loss sums."""
    s = lim.windows[P.TRAIN]
    epochs = int(lim.local_epochs)
    req: dict[str, Spec] = {}
    if lim.weights_up:
        req |= _weights(lim.weight_shapes, P.WEIGHTS_PREFIX, lead=(kk,), max_abs=lim.max_abs)
    step0 = int(request.get(P.STEP, 0))
    req |= {
        P.NUM_EXAMPLES: Ints((kk,), lo=0, hi=s * epochs),
        P.STEP: Int(step0, step0 + epochs * math.ceil(s / max(lim.batch_size, 1))),
    }
    return req | _loss_sums(mtype, reply, kk, s * epochs * lim.horizon)


def _h_c(s: int, kk: int | None, lim: ReplyLimits) -> dict[str, Spec]:
    return {P.H_C: Floats((s, kk, lim.layers, lim.hidden), max_abs=lim.max_abs)}


def _rep_h_c_of_split(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """``h_c`` ``[S, K, L, H]`` for every window of the split asked."""
    return _h_c(lim.windows[str(request[P.SPLIT])], kk, lim)


def _rep_h_c_of_batch(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """``h_c`` ``[B, K, L, H]`` for the batch asked."""
    return _h_c(len(request[P.BATCH]), kk, lim)


def _rep_h_c_of_ends(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """``h_c`` ``[W, K, L, H]`` for the window ends asked."""
    return _h_c(len(request[P.ENDS]), kk, lim)


def _rep_grad_of_batch(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """``dL/dh_G`` ``[B, K, L, H]`` for the batch asked, and its loss sums."""
    b = len(request[P.BATCH])
    req: dict[str, Spec] = {P.GRAD: Floats((b, kk, lim.layers, lim.hidden), max_abs=lim.max_abs)}
    return req | _loss_sums(mtype, reply, kk, b * lim.horizon)


def _rep_evaluate(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """Error sums ``[K, horizon]``; forecasts ``[W, horizon, R]`` only when released."""
    hz = lim.horizon
    s = lim.windows[str(request[P.SPLIT])]
    req: dict[str, Spec] = {}
    for name in lim.sum_keys:
        cap = float(s) if name.endswith(_COUNT_SUFFIX) else None
        req[P.ERR_PREFIX + name] = Floats((kk, hz), np.float64, min_value=0.0, max_value=cap)
    w = len(request.get(P.REPORT, ()))
    if w and request.get(P.RELEASE):  # otherwise the forecasts stay on the node
        r = len(request[P.REPORT_NODES]) if P.REPORT_NODES in request else kk
        req[P.FORECAST] = Floats((w, hz, r), max_abs=lim.max_abs)
    return req


def _rep_forecast_of_ends(
    mtype: str, request: Mapping[str, Any], reply: Any, kk: int | None, lim: ReplyLimits
) -> dict[str, Spec]:
    """Forecasts ``[W, horizon, K]`` for the window ends asked."""
    return {P.FORECAST: Floats((len(request[P.ENDS]), lim.horizon, kk), max_abs=lim.max_abs)}


#: Reply schemas by the name a row of ``protocol.MESSAGES`` gives in ``reply``.
REPLY_SCHEMAS: dict[str, ReplySchema] = {
    "empty": _rep_empty,
    "hello": _rep_hello,
    "stats": _rep_stats,
    "local_train": _rep_local_train,
    "h_c_of_split": _rep_h_c_of_split,
    "h_c_of_batch": _rep_h_c_of_batch,
    "h_c_of_ends": _rep_h_c_of_ends,
    "grad_of_batch": _rep_grad_of_batch,
    "evaluate": _rep_evaluate,
    "forecast_of_ends": _rep_forecast_of_ends,
}
#: Optional keys of a reply schema (those without an entry have none).
REPLY_OPTIONAL: dict[str, ReplySchema] = {"hello": _rep_hello_optional}


def check_reply(
    mtype: str, request: Mapping[str, Any], reply: Any, k: int | None, lim: ReplyLimits
) -> P.Payload:
    """Check a client's reply to ``request``; returns the normalised reply.

    The schema is the one the message's row of ``protocol.MESSAGES`` names
    (:data:`REPLY_SCHEMAS`); a type without a row must answer with an empty reply.

    Args:
        mtype: the message type that was sent.
        request: the payload that was sent (the batch, split and report windows it named).
        reply: what came back.
        k: how many sensors this client hosts (None before the handshake).
        lim: sizes and bounds.

    Raises:
        MalformedMessage: a missing/unknown key, wrong shape or dtype, NaN/inf, a value
            above ``max_abs``, a negative sum, a count above the windows it counts.
    """
    kk = None if k is None else int(k)
    row = P.message(mtype)
    name = "empty" if row is None else row.reply
    req = REPLY_SCHEMAS[name](mtype, request, reply, kk, lim)
    opt = REPLY_OPTIONAL[name](mtype, request, reply, kk, lim) if name in REPLY_OPTIONAL else {}
    return _check_fields(mtype + " reply", reply, req, opt)
