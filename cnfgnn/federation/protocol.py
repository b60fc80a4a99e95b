"""The CNFGNN wire protocol: message types, payload keys and byte accounting.

A *payload* is a flat ``dict[str, np.ndarray | int | float | str]``. Every engine moves
payloads between the server orchestration and the client handlers; the Flower engines pack
them into ``RecordDict`` (arrays into an ``ArrayRecord``, scalars into a ``ConfigRecord``),
the in-process engine hands them over as they are. Neither side uses string literals for
message types or keys: they are the constants below.

:data:`MESSAGES` is the table of message types: name, whether answering it leaves the node's
state unchanged (``read_only``), what travels down and up, the ``NodeWorker`` method that
answers it and the names of its request and reply schemas. The ClientApp registers one
handler per row; ``NodeWorker.handle`` dispatches each to the row's method.

Strict schemas: :mod:`cnfgnn.federation.validate` checks each message against the schemas its
row names: every key a request or reply may carry (with dtype and shape); anything else is
refused as malformed. A new payload layout is a new named schema there.

What crosses the wire (docs/design.md §5): node-model weights, temporal encodings ``h_c``,
graph embeddings ``h_G``, gradients ``dL/dh_G``, and sums/counts. Never inputs or targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Payload = dict[str, Any]

# --- message types: "<train|evaluate|query>.<action>" (Flower's Message API naming) ---
HELLO = "query.hello"  # up: hosted node indices, sensor ids, windows per split
STATS = "query.stats"  # up: per-node sums/counts of the training inputs (scaler)
CONFIGURE = "query.configure"  # down: scaler, initial node model, training nodes
LOCAL_TRAIN = "train.local"  # down: step counter; up: per-node weights after R_c epochs
ENCODE = "query.encode"  # down: global node model; up: h_c for every window of a split
SPLIT_STEP = "train.split"  # down: h_G for a server batch; up: dL/dh_G, loss sums
EMBED = "query.embed"  # down: h_G for every training window (cached for next round)
EVALUATE = "evaluate.decode"  # down: h_G for a split; up: error sums per horizon
# Methods whose nodes keep their own models (local, FMTL, AT w/o FedAvg, split learning):
KEEP_MODEL = (
    "query.keep"  # down: ACTION keep_best | restore_best (the best model stays on the node)
)
# Split learning without alternation (docs/method.md §4.5): node and GN trained every step.
SL_ENCODE = "train.sl_encode"  # down: BATCH; up: h_c [B, K, L, H] of the batch
SL_DECODE = "train.sl_decode"  # down: h_G of the batch; up: dL/dh_G, loss sums
SL_BACKWARD = "train.sl_backward"  # down: dL/dh_c through the GN; the node steps its model

# Inference after training (docs/design.md §5 item 6, cnfgnn/federation/inference.py). Both are
# read-only on the node: the model and scaler come from CONFIGURE; windows are named by
# ENDS, the time index of their last input step (any index with a full input history).
PREDICT_ENCODE = "query.predict_encode"  # down: ENDS; up: h_c [W, K, L, H]
PREDICT = "query.predict"  # down: ENDS (+ h_G [W, K, L, H]); up: FORECAST [W, H, K] only
ENDS = "ends"  # [W] int64 time index of each window's last input step
NOISE = (
    "noise"  # float: input-noise level (std = level x the sensor's training std), robustness only
)
OWN_MODEL = "own_model"  # CONFIGURE, per-node methods: load the model the node kept at home

# Flower transport only: answered by the ClientApp itself (no NodeWorker), so that the
# FlowerEngine can map Flower node ids (which change when a SuperNode restarts) to clients.
IDENTIFY = "query.identify"  # up: the client's partition id and the number of partitions
PARTITION_ID = "partition_id"
NUM_PARTITIONS = "num_partitions"

# --- payload keys ---
NODES = "nodes"  # [K] int64 global node indices hosted by the client
SENSOR_IDS = "sensor_ids"  # str, comma-separated
NUM_WINDOWS = "num_windows"  # [3] int64: train/val/test windows
FIRST_START = "first_start"  # [3] int64: time index where each split's first window starts
SPLIT = "split"  # str: train | val | test
ROUND = "round"
STEP = "step"  # scheduled-sampling step counter (local + server batches)
WEIGHTS_PREFIX = "w."  # node-model tensors: "w.<name>" -> [K, ...] (up) or [...] (down)
NUM_EXAMPLES = "num_examples"  # [K] windows each node trained on
DP_NODES = "dp_nodes"  # int: nodes asked to train this round (node-side FedAvg noise)
ACTIVE = "active"  # [K] bool: which hosted nodes take part in training
SCALER_MEAN = "scaler_mean"  # [] or [K]
SCALER_STD = "scaler_std"
STAT_SUM = "stat_sum"  # [K]
STAT_SUMSQ = "stat_sumsq"  # [K]
STAT_COUNT = "stat_count"  # [K]
H_C = "h_c"  # [S, K, L, H] temporal encodings
H_G = "h_g"  # [S, K, L, H] graph embeddings
GRAD = "grad_h_g"  # [B, K, L, H] dL_k/dh_G (each node's own mean loss)
BATCH = "batch"  # [B] int64 window positions within the train split
LOSS_SUM = "loss_sum"  # [K] sum of squared scaled errors
LOSS_COUNT = "loss_count"  # [K]
ERR_PREFIX = "err."  # evaluation sums: "err.<name>" -> [K, horizon]
NBR_PREFIX = "nbr."  # FMTL: out-neighbours' weights "nbr.<name>" -> [M, ...] (round snapshot)
NBR_WEIGHT = (
    "nbr_weight"  # FMTL: [K, M] float64 adjacency weights A_ij of hosted node i -> neighbour j
)
ACTION = "action"  # str, KEEP_MODEL: keep_best | restore_best
KEEP_BEST, RESTORE_BEST = "keep_best", "restore_best"
GRAD_H_C = "grad_h_c"  # [B, K, L, H] d(sum of node losses)/dh_c through the GN (split learning)
# Test forecasts for plots stay on the node: REPORT asks it to keep them on its own disk.
REPORT = "report"  # [W] int64 window positions whose forecasts the node should keep
REPORT_NODES = "report_nodes"  # [R] int64 hosted sensors (global indices) to keep them for
RELEASE = "release"  # bool: also send them up (only under predictions.release=true)
FORECAST = "forecast"  # [W, H, R] float32, original units: EVALUATE with RELEASE; PREDICT (R = K)

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)


@dataclass(frozen=True)
class MessageType:
    """One row of the message table.

    Args:
        name: ``"<train|evaluate|query>.<action>"`` (Flower's message-type naming).
        read_only: answering leaves the node's state as it was (the ClientApp then neither
            saves the state nor counts a new version).
        down: what the server sends.
        up: what the node answers.
        method: the ``NodeWorker`` method that answers it (``NodeWorker.handle``).
        request: the request schema, a key of ``validate.REQUEST_SCHEMAS`` (node side).
        reply: the reply schema, a key of ``validate.REPLY_SCHEMAS`` (server side).
        needs_model: refused by a node built without a node model (data handling only).
        needs_config: refused before ``CONFIGURE`` (reads the scaled series).
    """

    name: str
    read_only: bool
    down: str
    up: str
    method: str
    request: str
    reply: str
    needs_model: bool = True
    needs_config: bool = True

    @property
    def category(self) -> str:
        """``train``, ``evaluate`` or ``query``: the ClientApp decorator that registers it."""
        return self.name.split(".", 1)[0]

    @property
    def action(self) -> str:
        return self.name.split(".", 1)[1]


#: Every message type a node answers (``NodeWorker.handle``), in protocol order. A new
#: type is one row here plus one ``NodeWorker`` method; its schemas are named rules of
#: :mod:`cnfgnn.federation.validate` (a new rule only for a new payload layout).
MESSAGES: tuple[MessageType, ...] = (
    MessageType(
        HELLO,
        True,
        "-",
        "NODES, SENSOR_IDS, NUM_WINDOWS, FIRST_START",
        method="hello",
        request="empty",
        reply="hello",
        needs_model=False,
        needs_config=False,
    ),
    MessageType(
        STATS,
        True,
        "-",
        "STAT_SUM, STAT_SUMSQ, STAT_COUNT [K]",
        method="stats",
        request="empty",
        reply="stats",
        needs_model=False,
        needs_config=False,
    ),
    MessageType(
        CONFIGURE,
        False,
        "scaler, node model, ACTIVE [K] (OWN_MODEL, FMTL NBR_*)",
        "-",
        method="configure",
        request="configure",
        reply="empty",
        needs_model=False,
        needs_config=False,
    ),
    MessageType(
        LOCAL_TRAIN,
        False,
        "STEP, ROUND (node model)",
        "weights [K, ...], NUM_EXAMPLES",
        method="local_train",
        request="local_train",
        reply="local_train",
    ),
    MessageType(
        ENCODE,
        False,
        "SPLIT (node model)",
        "H_C [S, K, L, H]",
        method="encode",
        request="encode",
        reply="h_c_of_split",
    ),
    MessageType(
        SPLIT_STEP,
        True,
        "BATCH, H_G [B, K, L, H], ROUND, STEP",
        "GRAD [B, K, L, H], LOSS_SUM, LOSS_COUNT [K]",
        method="split_step",
        request="split_step",
        reply="grad_of_batch",
    ),
    MessageType(
        EMBED,
        False,
        "H_G [S, K, L, H] of the train split",
        "-",
        method="embed",
        request="embed",
        reply="empty",
    ),
    MessageType(
        EVALUATE,
        False,
        "SPLIT (H_G, node model, REPORT)",
        "err.* [K, horizon] (FORECAST [W, H, K])",
        method="evaluate",
        request="evaluate",
        reply="evaluate",
    ),
    MessageType(
        KEEP_MODEL,
        False,
        "ACTION keep_best | restore_best",
        "-",
        method="keep_model",
        request="keep",
        reply="empty",
        needs_config=False,
    ),
    MessageType(
        SL_ENCODE,
        True,
        "BATCH",
        "H_C [B, K, L, H]",
        method="sl_encode",
        request="batch",
        reply="h_c_of_batch",
    ),
    MessageType(
        SL_DECODE,
        False,
        "BATCH, H_G [B, K, L, H]",
        "GRAD [B, K, L, H], LOSS_SUM, LOSS_COUNT [K]",
        method="sl_decode",
        request="batch_h_g",
        reply="grad_of_batch",
    ),
    MessageType(
        SL_BACKWARD,
        False,
        "GRAD_H_C [B, K, L, H]",
        "-",
        method="sl_backward",
        request="sl_backward",
        reply="empty",
    ),
    MessageType(
        PREDICT_ENCODE,
        True,
        "ENDS [W] (NOISE)",
        "H_C [W, K, L, H]",
        method="predict_encode",
        request="ends",
        reply="h_c_of_ends",
    ),
    MessageType(
        PREDICT,
        True,
        "ENDS [W] (H_G [W, K, L, H])",
        "FORECAST [W, H, K]",
        method="predict",
        request="ends_h_g",
        reply="forecast_of_ends",
    ),
)
MESSAGE_TYPES: tuple[str, ...] = tuple(m.name for m in MESSAGES)
#: Types whose answer leaves the node's state unchanged.
READ_ONLY = frozenset(m.name for m in MESSAGES if m.read_only)


def message(name: Any) -> MessageType | None:
    """The row of :data:`MESSAGES` named ``name`` (read at call time), or None."""
    return next((m for m in MESSAGES if m.name == name), None)


@dataclass
class ClientFailure:
    """A client that raised or did not answer: it is left out of the phase."""

    reason: str


def weights_to_payload(state: dict[str, Any]) -> Payload:
    """Prefix node-model tensors for a payload (``name -> w.name``)."""
    return {WEIGHTS_PREFIX + k: np.ascontiguousarray(_np(v)) for k, v in state.items()}


def weights_from_payload(payload: Payload) -> dict[str, np.ndarray]:
    """Inverse of :func:`weights_to_payload`."""
    n = len(WEIGHTS_PREFIX)
    return {k[n:]: v for k, v in payload.items() if k.startswith(WEIGHTS_PREFIX)}


def payload_nbytes(payload: Payload) -> tuple[int, int]:
    """Bytes of a payload: ``(tensor_bytes, other_bytes)``.

    ``tensor_bytes`` counts float32 arrays: model weights, ``h_c``, ``h_G``, ``dL/dh_G``
    (what the docs/design.md §5 formula counts). ``other_bytes`` counts the rest: float64
    sums and counts, integer arrays, strings, and scalars (8 bytes each).
    """
    floats = other = 0
    for value in payload.values():
        if isinstance(value, np.ndarray):
            if value.dtype == np.float32:
                floats += value.nbytes
            else:
                other += value.nbytes
        elif isinstance(value, str):
            other += len(value.encode())
        else:
            other += 8
    return floats, other


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
