"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import open_dict

from cnfgnn.config import RUN_CONFIG_KEY, compose
from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import build_workers
from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import InProcessEngine
from cnfgnn.federation.rounds import Orchestrator, ServerGraph
from cnfgnn.flower import client_app
from cnfgnn.procs import cmdline_of

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = ROOT / "data"  # the real datasets shipped in the package (data/README.md)

#: A 6-node, 3-day synthetic CNFGNN experiment that trains in seconds.
TINY = (
    "dataset=synthetic",
    "dataset.num_nodes=6",
    "dataset.days=3",
    "model.hidden_size=8",
    "model.gn.mlp_hidden=16",
    "model.gn.latent_size=8",
    "federation.rounds=2",
    "federation.batch_size=64",
    "federation.server_batch_size=48",
    "federation.eval_batch_size=256",
    "threads=1",
)


#: Keyword arguments that silence a run's progress lines (``run_experiment(..., **QUIET)``).
QUIET = {"progress": lambda s: None}
#: A small differential-privacy configuration (clip norms for the tiny model, one round).
DP = (
    "privacy=dp",
    "privacy.h_c.clip=1.0",
    "privacy.grad.clip=0.01",
    "privacy.fedavg.clip=0.5",
    "federation.rounds=1",
    "federation.scaling=per_node",
)
#: For tests that need repeatable noise (marked insecure in the run's outputs).
REPLAY = ("privacy.insecure_replayable_noise=true",)


def make_cfg(*overrides: str):
    """Compose ``conf/config.yaml`` with overrides (as the CLI would)."""
    return compose(list(overrides))


def in_process_federation(cfg, nodes_per_client: int | None = None, setup: bool = True):
    """``(data, workers, orchestrator)`` of ``cfg`` in-process on the CPU, quiet, without a
    writer; ``nodes_per_client`` overrides the config's; ``setup``: handshake done."""
    if nodes_per_client is not None:
        with open_dict(cfg):
            cfg.federation.nodes_per_client = nodes_per_client
    data = load_dataset(cfg.dataset)
    workers = build_workers(cfg, data, torch.device("cpu"))
    orch = Orchestrator(cfg, InProcessEngine(workers), ServerGraph.from_data(data), None, **QUIET)
    if setup:
        orch.setup()
    return data, workers, orch


#: What a client may send up in training and test: handshake facts, statistics, losses, h_c,
#: gradients (plus ``P.WEIGHTS_PREFIX`` / ``P.ERR_PREFIX`` keys). No exemption: by default a
#: node's forecasts stay on its own disk (``predictions.release=false``).
TRAINING_UP = {
    P.NODES,
    P.SENSOR_IDS,
    P.NUM_WINDOWS,
    P.FIRST_START,
    P.STAT_SUM,
    P.STAT_SUMSQ,
    P.STAT_COUNT,
    P.NUM_EXAMPLES,
    P.LOSS_SUM,
    P.LOSS_COUNT,
    P.STEP,
    P.H_C,
    P.GRAD,
}
#: What a client may send up during inference: handshake facts, statistics, h_c, forecasts.
INFERENCE_UP = {
    P.NODES,
    P.SENSOR_IDS,
    P.NUM_WINDOWS,
    P.FIRST_START,
    P.STAT_SUM,
    P.STAT_SUMSQ,
    P.STAT_COUNT,
    P.H_C,
    P.FORECAST,
}


class RecordingEngine:
    """Wraps an engine and keeps every payload the server receives."""

    def __init__(self, inner):
        self.inner, self.received = inner, []

    def client_ids(self):
        return self.inner.client_ids()

    def send(self, mtype, payloads):
        replies = self.inner.send(mtype, payloads)
        self.received.extend((mtype, r) for r in replies.values())
        return replies


def windows(series: np.ndarray, length: int = 12) -> set[bytes]:
    """Byte strings of every run of ``length`` consecutive values of each column."""
    out = set()
    for col in np.asarray(series, np.float32).T:
        for i in range(len(col) - length + 1):
            out.add(col[i : i + length].tobytes())
    return out


def check_private(
    received, data, scaler, allowed: set[str], prefixes: tuple[str, ...] = (P.ERR_PREFIX,)
) -> None:
    """The privacy invariant on what the server received: only ``allowed`` keys (or keys
    starting with ``prefixes``), no whole series, no target-shaped array (but forecasts where
    ``allowed`` has them: inference), and
    no 12 consecutive values of any sensor's raw or scaled series along any axis."""
    forbidden = windows(data.speed) | windows(scaler.transform(data.speed).astype(np.float32))
    t_len = data.speed.shape[0]
    assert received
    for mtype, payload in received:
        for key, value in payload.items():
            assert key in allowed or key.startswith(prefixes), (mtype, key)
            arr = np.asarray(value)
            if arr.dtype.kind != "f" or arr.size < 12:
                continue
            assert t_len not in arr.shape, (mtype, key, arr.shape)  # no whole series
            assert (
                12 not in arr.shape[:2]
                or key.startswith(P.ERR_PREFIX)
                or arr.ndim != 3
                or (key == P.FORECAST and key in allowed)
            ), key  # forecasts [W, H, K]
            flat32 = arr.astype(np.float32)
            for axis in range(arr.ndim):
                for row in np.moveaxis(flat32, axis, -1).reshape(-1, arr.shape[axis]):
                    for i in range(len(row) - 11):
                        assert row[i : i + 12].tobytes() not in forbidden, (mtype, key)


def same_state(a, b) -> None:
    """Two ``NodeWorker.state_dict()`` are equal (tensors exactly; the optimizer skipped)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        elif key != "optimizer":
            np.testing.assert_equal(a[key], b[key])


class LoopbackGrid(Grid):
    """Delivers each message to the real ClientApp in this process (one Context per node).

    ``fresh_process``: every message starts from an empty worker cache (a deployment);
    ``actors > 1``: each message goes to one of that many worker caches, drawn from a seeded
    generator (a simulation's Ray actors, where a node's messages land on any of them)."""

    def __init__(
        self, overrides: str, num_nodes: int, run_id: int, fresh_process: bool, actors: int = 1
    ):
        self.fresh_process = fresh_process
        self.caches = [client_app._WORKERS] + [OrderedDict() for _ in range(actors - 1)]
        self.draw = random.Random(actors)
        self.replies: dict[str, Message] = {}
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={RUN_CONFIG_KEY: overrides},
            )
            for i in range(num_nodes)
        }

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated API
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            if self.fresh_process:  # deployment: a new ClientApp process per message
                client_app._WORKERS.clear()
            home = client_app._WORKERS
            client_app._WORKERS = self.caches[self.draw.randrange(len(self.caches))]
            try:
                reply = client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # as Flower: an error reply, the context unchanged
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            finally:
                client_app._WORKERS = home
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        return self.pull_messages(self.push_messages(messages))


# ---------------------------------------------------------------------- deployment faults
def processes_of(path: Path) -> list[int]:
    """Pids whose command line names ``path`` (the processes a test started under it)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and str(path) in cmdline_of(int(p))]


def kill_supernode(dep, i: int) -> None:
    """SIGKILL SuperNode ``i`` of a ``Deployment`` and its ClientApp processes (a crash)."""
    dep.procs.kill(f"supernode_{i}")
    dep.progress(f"[test] killed SuperNode {i} (partition {i})")


def restart_supernode(dep, i: int, wait: bool = True) -> float:
    """Start SuperNode ``i`` again (same partition, shard and state dir); seconds to ready."""
    t0 = time.monotonic()
    dep.start_supernode(i)
    if wait:
        dep.wait_ready([i], rejoin=True)
    dep.progress(f"[test] restarted SuperNode {i}")
    return time.monotonic() - t0


def server_pids(dep) -> list[int]:
    """The ServerApp process(es) of the current run (in the SuperLink's group)."""
    pids = [
        p
        for name in ("superlink", "superexec")
        if name in dep.procs.procs
        for p in dep.procs.procs[name].group_pids()
    ]
    return [p for p in pids if "flwr-serverapp" in cmdline_of(p)]


def kill_server(dep) -> list[int]:
    """SIGKILL the ServerApp process of the running run (the SuperLink stays up)."""
    pids = server_pids(dep)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    dep.progress(f"[test] killed the ServerApp {pids}")
    return pids


def kill_superlink(dep) -> None:
    """SIGKILL the SuperLink (and its ServerApp)."""
    dep.procs.kill("superlink")
    dep.procs.kill("superexec")
    dep.progress("[test] killed the SuperLink (and its ServerApp)")


def inprocess_and_loopback(
    tmp: Path, run_id: int, *args: str, actors: int = 0
) -> tuple[dict, dict]:
    """The same config (``args``) run in-process (``tmp/a``) and through the real ServerApp
    and ClientApp over a :class:`LoopbackGrid` of 3 nodes, a fresh process per message
    (``actors > 0``: that many worker caches instead; ``tmp/b/run``; node state under
    ``$CNFGNN_STATE_ROOT``, set by the caller's ``flower_env``):
    ``(in-process final, Flower final)``."""
    from cnfgnn.config import compose_cfg, overrides_for
    from cnfgnn.experiment import run_experiment
    from cnfgnn.flower import server_app

    ref, _ = run_experiment(make_cfg(*args, f"output_root={tmp}/a"), **QUIET)
    cfg = make_cfg(*args, f"output_root={tmp}/b", "engine=simulation")
    overrides = overrides_for(cfg, tmp / "b" / "run")
    grid = LoopbackGrid(
        overrides, num_nodes=3, run_id=run_id, fresh_process=actors == 0, actors=max(actors, 1)
    )
    final = server_app.run_server(grid, compose_cfg(overrides), run_id=None, **QUIET)
    return ref, final
