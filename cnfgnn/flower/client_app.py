"""The Flower ClientApp: thin handlers around :class:`cnfgnn.federation.node.NodeWorker`.

One handler per message type of :mod:`cnfgnn.federation.protocol`. Each composes the run's
config (``hydra-overrides``), gets this client's worker, unpacks the payload, calls
``worker.handle`` and packs the reply. The CNFGNN math lives in ``node.py``.

Which sensors this client hosts (``context.node_config``):

* ``data-dir``: a deployment shard written by :mod:`cnfgnn.data.shards` (only this client's
  series); ``partition-id`` names the client;
* otherwise (simulation) ``partition-id`` / ``num-partitions``: the client's nodes are
  ``client_groups(cfg, data)[partition-id]`` of the dataset in ``cfg.dataset``.

The node's own disk (its *store*: per-node methods' kept models, the test forecasts kept for
plots; see :class:`~cnfgnn.federation.node.NodeWorker`): node_config ``store-dir`` when
given; else, on a deployment node (``data-dir``), ``<state-root>/<run_id>/node_store``, which
stays on the site; else (simulation, all nodes on this machine) ``<run_dir>/node_store``, as
in-process.

State between messages. Flower keeps ``context.state`` per (run, node), but in simulation a
node's messages land on any Ray actor, and in deployment every message starts a fresh
process. So the worker's mutable state (``NodeWorker.state_dict``: model, optimizer,
scaler, ``h_c``, ``h_G``, round) is saved on the node's disk under
``<state-root>/<run_id>/client_<partition-id>/`` after every message that changes it, the
changed entries only (:mod:`cnfgnn.flower.node_state`), and ``context.state`` carries only
its version number. A process that already holds the current version in memory skips the
reload; one that holds an older version reads only what changed since.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.compat.common import recorddict_compat as compat
from omegaconf import OmegaConf

from cnfgnn import optim
from cnfgnn.config import compose_cfg, overrides_from_run_config, state_root
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.nodes import client_groups
from cnfgnn.data.shards import load_shard
from cnfgnn.device import resolve_device
from cnfgnn.federation import protocol as P
from cnfgnn.federation import secure
from cnfgnn.federation.node import LocalSeries, NodeWorker
from cnfgnn.federation.validate import MALFORMED_CODE, MalformedMessage
from cnfgnn.flower import node_state, secagg
from cnfgnn.flower.codec import pack, unpack

log = logging.getLogger(__name__)

# secaggplus_mod acts on legacy "train" messages only (the FedAvg phase under
# privacy.secagg, cnfgnn/flower/secagg.py); every other message passes through it untouched.
app = ClientApp(mods=[secaggplus_mod])

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_DIR = "data-dir"
STORE_DIR = "store-dir"  # optional: the node's own disk for what it keeps (models, forecasts)
STATE_RECORD = "cnfgnn"  # ConfigRecord in context.state: {"version": int}
VERSION = "version"

_DATA: dict[str, Any] = {}  # dataset config -> (data, time of day, client groups), per process
_WORKERS: OrderedDict[tuple[int, int], node_state.Held] = OrderedDict()  # (run, partition)


# ---------------------------------------------------------------------- helpers
def _action(message_type: str) -> str:
    return message_type.split(".", 1)[1]


def _partition(context: Context) -> int:
    if PARTITION_ID not in context.node_config:
        raise ValueError(
            "node_config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n> data-dir=<shard>'"
        )
    return int(context.node_config[PARTITION_ID])


def _series(cfg: Any, node_config: Any) -> LocalSeries:
    """This client's own series: its shard (deployment) or its columns (simulation)."""
    if DATA_DIR in node_config:
        shard = load_shard(Path(str(node_config[DATA_DIR])))
        return LocalSeries.from_arrays(
            shard.node_indices,
            list(shard.sensor_ids),
            shard.speed,
            shard.mask,
            shard.time_of_day(),
            cfg.dataset,
        )
    key = str(cfg.dataset)
    if key not in _DATA:
        _DATA.clear()  # one dataset per process at a time
        data = load_dataset(cfg.dataset)
        _DATA[key] = (data, data.time_of_day(), client_groups(cfg, data))
    data, tod, groups = _DATA[key]
    pid = int(node_config[PARTITION_ID])
    n = int(node_config.get(NUM_PARTITIONS, len(groups)))
    if n != len(groups) or not 0 <= pid < len(groups):
        raise ValueError(
            f"partition {pid} of {n}, but federation.nodes_per_client="
            f"{cfg.federation.nodes_per_client} gives {len(groups)} clients; "
            f"start the simulation with num-supernodes={len(groups)}"
        )
    return LocalSeries.from_data(data, groups[pid], cfg.dataset, tod)


def state_dir(cfg: Any, context: Context) -> Path:
    """This client's state between messages (:mod:`cnfgnn.flower.node_state`)."""
    root = state_root(cfg, context.node_config)
    return root / str(context.run_id) / f"client_{_partition(context)}"


def node_store(cfg: Any, context: Context) -> Path:
    """This node's own disk for what it keeps (see the module docstring)."""
    from cnfgnn.results import NODE_STORE

    if STORE_DIR in context.node_config:
        return Path(str(context.node_config[STORE_DIR]))
    if DATA_DIR in context.node_config or not cfg.get("run_dir"):  # a site's own state dir
        return state_root(cfg, context.node_config) / str(context.run_id) / NODE_STORE
    return Path(str(cfg.run_dir)) / NODE_STORE  # simulation: every node on this machine


def _context_version(context: Context) -> int | None:
    if STATE_RECORD in context.state:
        return int(context.state[STATE_RECORD][VERSION])
    return None


def _worker(cfg: Any, context: Context) -> node_state.Held:
    """This client's worker at the version ``context.state`` names: held in memory, else
    brought up to date from disk (an older version held here reads only the entries
    written since; none held: a new worker reads them all). Before the first save, the
    fresh worker built at identification (:func:`_prepare`) is used.

    Raises:
        RuntimeError: ``context.state`` names a saved version but no state is on this
            process's disk (a Ray node that does not share ``engine.state_root``).
    """
    key = (int(context.run_id), _partition(context))
    version = _context_version(context)
    held = _WORKERS.get(key)
    if held is not None and version is not None and held.version == version:
        _WORKERS.move_to_end(key)
        return held
    directory = state_dir(cfg, context)
    stored = node_state.latest(directory)
    if stored is None:
        if version:  # this node saved a state that this process cannot see: never start over
            raise RuntimeError(
                f"client {key[1]}: its state (version {version}) is not under {directory}; on "
                "a Ray cluster of several machines engine.state_root must be a directory "
                "that every node shares (docs/benchmark.md#flower-simulation-on-a-ray-cluster)"
            )
        if held is None or held.version != 0:
            held = node_state.Held(0, _new_worker(cfg, context), {}, {})
    else:  # also after a SuperNode restart (fresh context, state on disk)
        if version is not None and stored.version != version:
            log.warning(
                "client %s: state on disk is version %s, context expects %s; using the disk",
                key[1],
                stored.version,
                version,
            )
        worker = _new_worker(cfg, context) if held is None else held.worker
        held = node_state.load(directory, stored, worker, held)
    _remember(cfg, key, held)
    return held


def _new_worker(cfg: Any, context: Context) -> NodeWorker:
    return NodeWorker(
        _series(cfg, context.node_config),
        cfg,
        resolve_device(str(cfg.device)),
        store=node_store(cfg, context),
    )


def _remember(cfg: Any, key: tuple[int, int], held: node_state.Held) -> None:
    _WORKERS[key] = held
    _WORKERS.move_to_end(key)
    limit = int(cfg.engine.get("worker_cache", 256))
    while len(_WORKERS) > max(limit, 0):
        _WORKERS.popitem(last=False)


def _save(cfg: Any, context: Context, held: node_state.Held) -> None:
    """Persist the worker as the next version (what changed) and name it in the context."""
    held = node_state.save(state_dir(cfg, context), held, held.version + 1)
    context.state[STATE_RECORD] = ConfigRecord({VERSION: held.version})
    _remember(cfg, (int(context.run_id), _partition(context)), held)


def _config(context: Context) -> Any:
    """The run's config (composed once per process), with this process's torch threads."""
    cfg = compose_cfg(overrides_from_run_config(context.run_config))
    threads = int(cfg.engine.get("client_threads", 1))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return cfg


def _prepare(context: Context) -> None:
    """With ``engine.prepare_at_identify``, what this client's first message would otherwise
    pay, paid at identification (before round 1): the config, the dataset (once per
    process), a fresh worker, and ``torch._dynamo``, which ``torch.optim`` imports when a
    process makes its first optimizer (about 1 s). A failure here is logged and left to the
    first message that needs the worker, which reports it to the server."""
    try:
        cfg = _config(context)
        if not cfg.engine.get("prepare_at_identify", False):
            return
        optim.prepare()
        _worker(cfg, context)
    except Exception as exc:  # noqa: BLE001 - reported by the first message instead
        log.warning("client %s: preparing at identification failed: %r", _partition(context), exc)


def _inject_fault(cfg: Any, partition: int, message_type: str) -> None:
    """Fault injection for tests and demos (off unless ``engine.fault`` is set), e.g.
    ``++engine.fault={partition:2,message_type:train.local}`` (raise) or a list of
    ``{partition, message_type, mode: sleep, seconds}`` entries. ``marker: <path>`` touches
    that file when the fault fires (a test then knows the node is inside the phase)."""
    faults = cfg.engine.get("fault")
    if not faults:
        return
    for fault in faults if OmegaConf.is_list(faults) else [faults]:
        if int(fault.partition) != partition:
            continue
        if fault.get("message_type") not in (None, message_type):
            continue
        if fault.get("marker"):
            Path(str(fault.marker)).touch()
        if fault.get("mode", "raise") == "sleep":
            time.sleep(float(fault.get("seconds", 60)))
        else:
            raise RuntimeError(f"injected fault: partition {partition} on {message_type}")


def _answer(
    msg: Message,
    context: Context,
    mtype: str,
    decode: Callable[[RecordDict], P.Payload],
    encode: Callable[[P.Payload, P.Payload], RecordDict],
) -> Message:
    """Compose the config, get the worker, answer the message, persist what changed.

    ``decode`` turns the content into a payload, ``encode(request, reply)`` the worker's
    reply into the content sent back."""
    cfg = _config(context)
    pid = _partition(context)
    _inject_fault(cfg, pid, msg.metadata.message_type)
    held = _worker(cfg, context)
    key = (int(context.run_id), pid)
    try:
        try:
            payload = decode(msg.content)
        except Exception as exc:  # a RecordDict that is not a packed payload
            raise MalformedMessage(f"{mtype}: cannot unpack the content: {exc!r}") from exc
        reply = encode(payload, held.worker.handle(mtype, payload))
        if mtype not in P.READ_ONLY:
            _save(cfg, context, held)
    except MalformedMessage as exc:  # refused before dispatch: the worker is unchanged
        log.warning("client %s refused a malformed %s: %s", pid, mtype, exc)
        return Message(Error(code=MALFORMED_CODE, reason=f"MalformedMessage: {exc}"), reply_to=msg)
    except BaseException:
        _WORKERS.pop(key, None)  # the worker may be half-updated: reload next time
        raise
    return Message(reply, reply_to=msg)


def _handle(msg: Message, context: Context) -> Message:
    """One message of the table: a packed payload in, a packed payload out."""
    return _answer(
        msg, context, msg.metadata.message_type, unpack, lambda request, reply: pack(reply)
    )


def _secure_reply(request: P.Payload, reply: P.Payload) -> RecordDict:
    """The client's FedAvg contribution as a legacy FitRes (``secaggplus_mod`` masks it)."""
    res = secagg.contribution_fitres(secure.client_contribution(request, reply), int(reply[P.STEP]))
    return compat.fitres_to_recorddict(res, keep_input=True)


@app.train()
def secure_train(msg: Message, context: Context) -> Message:
    """The FedAvg phase under ``privacy.secagg`` (legacy ``"train"``, through SecAgg+).

    ``secaggplus_mod`` runs the protocol's key stages itself and calls this handler once,
    in its masked-vector stage, with our ``train.local`` request as a legacy ``FitIns``."""
    return _answer(
        msg,
        context,
        P.LOCAL_TRAIN,
        lambda content: secagg.fitins_to_payload(
            compat.recorddict_to_fitins(content, keep_input=True)
        ),
        _secure_reply,
    )


# ---------------------------------------------------------------------- handlers
@app.query(_action(P.IDENTIFY))
def identify(msg: Message, context: Context) -> Message:
    """Which client this SuperNode is (the server maps Flower node ids with it)."""
    pid = _partition(context)
    n = int(context.node_config.get(NUM_PARTITIONS, -1))
    _prepare(context)
    return Message(pack({P.PARTITION_ID: pid, P.NUM_PARTITIONS: n}), reply_to=msg)


# one handler per row of the message table (protocol.MESSAGES), all the same
for _message in P.MESSAGES:
    getattr(app, _message.category)(_message.action)(_handle)
