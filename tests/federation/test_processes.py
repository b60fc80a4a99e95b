"""The in-process engine's clients in forked processes (engine.processes): the same run as one
process, nothing private up, a failing or dying client left out, every child stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cnfgnn.data.errors import DataError
from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import build_workers, run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import InProcessEngine, local_engine
from cnfgnn.federation.processes import ProcessEngine, blocks, client_processes
from tests.helpers import TINY, TRAINING_UP, RecordingEngine, check_private, make_cfg

CPU = torch.device("cpu")
PER_SENSOR = (*TINY, "federation.nodes_per_client=1")  # 6 clients


def _gone(pid: int) -> bool:
    """No such process, or only its exit status is left (a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (OSError, IndexError):
        return True


#: A parent that forks two client processes and is then killed without stopping them.
ORPHANING = """
import os, signal, types
from cnfgnn.federation.processes import ProcessEngine

class Stub:
    series = types.SimpleNamespace(nodes=[0])
    def handle(self, mtype, payload):
        return {}

engine = ProcessEngine({0: Stub(), 1: Stub()}, 2)
print(*engine.pids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_two_processes_give_the_same_run_and_send_nothing_private(tmp_path):
    """With one torch thread everywhere, clients in 2 forked processes reproduce the run of
    one process exactly, and what the server received passes the privacy check."""
    rec: dict = {}

    def serial(engine):
        assert isinstance(engine, InProcessEngine)
        rec["workers"] = engine.workers
        return engine

    def parallel(engine):
        assert isinstance(engine, ProcessEngine) and len(engine.pids) == 2
        rec["pids"] = engine.pids
        rec["engine"] = RecordingEngine(engine)
        return rec["engine"]

    runs = []
    for n, wrap in ((1, serial), (2, parallel)):
        cfg = make_cfg(*PER_SENSOR, f"output_root={tmp_path}/{n}", f"engine.processes={n}")
        final, writer = run_experiment(cfg, progress=lambda s: None, engine_wrapper=wrap)
        runs.append((final, writer.rounds()))
    (a, rounds_a), (b, rounds_b) = runs
    assert b["nodes"]["clients"] == 6
    assert b["test"] == a["test"]
    for ra, rb in zip(rounds_a, rounds_b, strict=True):
        for key in ("train_loss", "split_loss", "val_loss"):
            if key in ra:
                assert rb[key] == ra[key], key
    assert all(_gone(pid) for pid in rec["pids"])  # stopped when the run ended
    data = load_dataset(cfg.dataset)
    scaler = next(iter(rec["workers"].values())).scaler  # the same data, the same scaler
    check_private(
        rec["engine"].received, data, scaler, TRAINING_UP, (P.WEIGHTS_PREFIX, P.ERR_PREFIX)
    )


def test_a_resumed_run_in_two_processes_ends_as_the_uninterrupted_one(tmp_path):
    """``resume=true`` with the clients in forked processes: the new processes restore the
    clients' state from the checkpoint through the same messages, and the run ends as one
    that never stopped."""
    two = (*PER_SENSOR, "engine.processes=2")
    quiet = {"progress": lambda s: None}
    full, _ = run_experiment(
        make_cfg(*two, f"output_root={tmp_path}/a", "federation.rounds=4"), **quiet
    )
    _, writer = run_experiment(
        make_cfg(*two, f"output_root={tmp_path}/b", "federation.rounds=2"), **quiet
    )
    resumed, writer2 = run_experiment(
        make_cfg(*two, f"output_root={tmp_path}/b", "federation.rounds=4", "resume=true"),
        run_dir=writer.dir,
        **quiet,
    )
    assert [r["round"] for r in writer2.rounds()] == [1, 2, 3, 4]
    assert resumed["test"]["rmse"] == pytest.approx(full["test"]["rmse"], rel=1e-5)
    assert resumed["best_round"] == full["best_round"]


class _Raises:
    """A client whose handler raises (a broken sensor)."""

    def __init__(self, inner):
        self.series = inner.series

    def handle(self, mtype, payload):
        raise RuntimeError("sensor offline")


class _Exits:
    """A client that kills its whole process on its first message (a crash)."""

    def __init__(self, inner):
        self.series = inner.series

    def handle(self, mtype, payload):
        os._exit(3)


def test_failing_and_dying_clients_are_reported_and_children_stop():
    cfg = make_cfg(*PER_SENSOR)
    workers = build_workers(cfg, load_dataset(cfg.dataset), CPU)
    workers[1] = _Raises(workers[1])
    workers[4] = _Exits(workers[4])
    engine = ProcessEngine(workers, 2)
    try:
        assert engine.blocks == [[0, 1, 2], [3, 4, 5]]
        first = engine.send(P.HELLO, {c: {} for c in range(6)})
        assert isinstance(first[1], P.ClientFailure) and "sensor offline" in first[1].reason
        for c in (4, 5):  # 4 took its process down, and 5 with it
            assert isinstance(first[c], P.ClientFailure), c
            assert "exited with code 3" in first[c].reason
        for c in (0, 2, 3):
            assert np.array_equal(first[c][P.NODES], [c]), c
        second = engine.send(P.HELLO, {c: {} for c in (0, 3, 9)})
        assert not isinstance(second[0], P.ClientFailure)
        assert "exited" in second[3].reason  # its process is gone for the rest of the run
        assert "no client 9" in second[9].reason
    finally:
        engine.close()
    assert all(_gone(pid) for pid in engine.pids)
    assert "closed" in engine.send(P.HELLO, {0: {}})[0].reason


def test_children_exit_when_their_parent_is_killed():
    """A parent killed with SIGKILL cannot stop its children: they see their pipe close and
    exit on their own (every one of them, not only the last forked)."""
    out = subprocess.run(
        [sys.executable, "-c", ORPHANING], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == -9, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), pids


def test_process_count():
    cuda = torch.device("cuda")
    assert client_processes("auto", clients=207, threads=2, device=CPU) == 2
    assert client_processes(None, clients=1, threads=2, device=CPU) == 1  # all in one client
    assert client_processes("auto", clients=207, threads=1, device=CPU) == 1
    assert client_processes("auto", clients=207, threads=2, device=cuda) == 1
    assert client_processes(4, clients=3, threads=2, device=CPU) == 3
    assert client_processes("1", clients=3, threads=2, device=cuda) == 1
    for bad in (0, -1, "two", 2.5):
        with pytest.raises(DataError, match="Fix: engine.processes=auto"):
            client_processes(bad, clients=3, threads=2, device=CPU)
    with pytest.raises(DataError, match="Fix: engine.processes=1"):
        client_processes(2, clients=3, threads=2, device=cuda)


def test_blocks_are_contiguous_balanced_and_never_empty():
    assert blocks({c: 1 for c in range(5)}, 2) == [[0, 1, 2], [3, 4]]
    assert blocks({0: 8, 1: 8, 2: 8, 3: 3}, 2) == [[0, 1], [2, 3]]
    assert blocks({0: 100, 1: 1, 2: 1}, 3) == [[0], [1], [2]]
    assert blocks({7: 5}, 4) == [[7]]
    sizes = {c: 1 + c % 3 for c in range(50)}
    out = blocks(sizes, 4)
    assert [c for b in out for c in b] == sorted(sizes)
    loads = [sum(sizes[c] for c in b) for b in out]
    assert max(loads) - min(loads) <= 3


def test_local_engine_follows_the_config():
    cfg = make_cfg(*PER_SENSOR, "engine.processes=2")
    workers = build_workers(cfg, load_dataset(cfg.dataset), CPU)
    engine = local_engine(cfg, workers, CPU)
    try:
        assert isinstance(engine, ProcessEngine) and engine.client_ids() == list(range(6))
    finally:
        engine.close()
    one = make_cfg(*TINY, "federation.nodes_per_client=null", "engine.processes=2")
    only = build_workers(one, load_dataset(one.dataset), CPU)
    assert isinstance(local_engine(one, only, CPU), InProcessEngine)  # one client: no fork


#: A fresh interpreter that forks two client processes and asks each whether it can make its
#: first optimizer without importing torch._dynamo (the import torch.optim does then).
FIRST_OPTIMIZER = """
import sys, types
from cnfgnn.federation.processes import ProcessEngine

class Stub:
    series = types.SimpleNamespace(nodes=[0])
    def handle(self, mtype, payload):
        return {"had_dynamo": "torch._dynamo" in sys.modules}

assert "torch._dynamo" not in sys.modules
engine = ProcessEngine({0: Stub(), 1: Stub()}, 2)
try:
    replies = engine.send("query.ping", {0: {}, 1: {}})
finally:
    engine.close()
print(sorted(r["had_dynamo"] for r in replies.values()))
"""


def test_children_inherit_what_the_first_optimizer_imports():
    """The parent imports torch._dynamo before it forks (1-2 s on 2 cores), so no child pays
    for it inside the first round's local training."""
    out = subprocess.run(
        [sys.executable, "-c", FIRST_OPTIMIZER], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[True, True]"
