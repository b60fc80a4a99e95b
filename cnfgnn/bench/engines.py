"""``cnfgnn-bench``: every engine on the same data and seeds, side by side (``make bench``).

Usage::

    cnfgnn-bench [HYDRA_OVERRIDES...]
    cnfgnn-bench                                   # conf/bench/default.yaml (207 nodes)
    cnfgnn-bench dataset.days=3 bench.rounds=2     # smaller, faster
    cnfgnn-bench bench.mode=multibatch             # server batches per round trip: 1 vs 4
    cnfgnn-bench bench.mode=scale                  # 1,000 and 8,600 nodes, in-process
    cnfgnn-bench bench=los_loop                    # the real Los-loop data (207 sensors)

One run composes ``conf/`` with the ``bench`` group (``conf/bench/default.yaml``, or
``bench=los_loop`` for ``conf/bench/los_loop.yaml``; any override works:
``cnfgnn-bench dataset.days=3 bench.rounds=2``). In engines mode it first calibrates this
machine's fp32 matmul throughput at the round's shapes (:mod:`cnfgnn.bench.calibrate`) and
measures the per-message overhead of an in-process client (:mod:`cnfgnn.bench.overhead`),
then measures, each case in its own subprocess so that peak memories are separate:

* ``central``: the same CNFGNN round math in one process with no messaging
  (:class:`cnfgnn.bench.central_limit.CentralCNFGNN`): the limit on this hardware;
* ``inprocess_*``: the :class:`~cnfgnn.federation.rounds.Orchestrator` over the
  :class:`~cnfgnn.federation.engines.InProcessEngine`, all nodes in one client or one
  client per sensor;
* ``flower_*``: the same orchestration as a Flower simulation (Ray), K sensors per client.

Per case and round: wall seconds, seconds per phase (the orchestrator's names), round
trips and client messages, payload bytes per phase and direction (and Flower's serialized
bytes), peak resident memory of the case's process tree, the round's losses; then ratios
between cases, the goals of ``bench.goals``, each case's achieved GFLOP/s and
``flop_fraction`` against the calibrated limit, and a projection to a METR-LA-sized round.
One JSON document goes to stdout and to ``<bench.out_dir>/<timestamp>/bench.json``; the
cases' logs and run directories sit next to it.

Other modes: ``bench.mode=multibatch`` (``federation.server_batches_per_trip`` 1 vs 4: time
per round and validation loss), ``bench.mode=scale`` (the in-process engine at 1,000 and
8,600 nodes: seconds and memory per phase, and what breaks first).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cnfgnn import machine
from cnfgnn.config import compose, flower_environment
from cnfgnn.federation import protocol as P
from cnfgnn.procs import ProcessSet
from cnfgnn.tables import mean_std

BENCH_GROUP = "bench"
SETUP_TYPES = (P.HELLO, P.STATS, P.CONFIGURE, P.IDENTIFY)
ROUND_PHASES_TRAIN = ("local", "encode", "split", "split_server", "embed", "embed_server")
ROUND_PHASES_VAL = ("val", "val_server")


# ---------------------------------------------------------------------- config
def compose_bench(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` + the bench group + ``overrides`` (``bench=<file>`` picks another)."""
    group = [o for o in overrides if o.lstrip("+").startswith(f"{BENCH_GROUP}=")]
    rest = [o for o in overrides if o not in group]
    choice = group[-1].lstrip("+").split("=", 1)[1] if group else "default"
    from cnfgnn.shell import compose as checked_compose  # unknown keys: exit 2, close names

    return checked_compose([f"+{BENCH_GROUP}={choice}", *rest])


def case_config(
    cfg: DictConfig, case: dict[str, Any], extra: dict[str, Any] | None = None
) -> DictConfig:
    """The experiment config of one case: resolved, without the ``bench`` section.

    ``case['engine']`` picks the ``engine`` group (``central`` runs with ``inprocess``'s),
    ``case['nodes_per_client']`` sets ``federation.nodes_per_client`` (null: all nodes),
    ``case['threads']`` and ``case['processes']``, when given, the case's ``threads`` and
    ``engine.processes``; ``case['set']`` maps dotted keys to values for this case alone
    (e.g. ``{engine.fuse_clients: false}``). ``extra`` maps dotted keys to values set
    afterwards.
    """
    engine = "inprocess" if case["engine"] == "central" else str(case["engine"])
    eng = compose([f"engine={engine}"]).engine
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop(BENCH_GROUP, None)
    plain.pop("hydra", None)
    out = OmegaConf.create(plain)
    out.engine = eng
    if "threads" in case:
        out.threads = case["threads"]
    if "processes" in case:
        out.engine.processes = case["processes"]
    for key, value in {**dict(case.get("set") or {}), **(extra or {})}.items():
        OmegaConf.update(out, key, value, merge=False)
    k = case.get("nodes_per_client")
    out.federation.nodes_per_client = dataset_nodes(out.dataset) if k is None else int(k)
    return out


def dataset_nodes(dataset: Any) -> int:
    """Nodes of a dataset config: its ``num_nodes`` (synthetic), else counted in the loaded
    data (a real dataset such as Los-loop, loaded once per process)."""
    if dataset.get("num_nodes") is not None:
        return int(dataset.num_nodes)
    return _loaded_nodes(json.dumps(OmegaConf.to_container(dataset, resolve=True)))


@functools.lru_cache(maxsize=4)
def _loaded_nodes(dataset_json: str) -> int:
    from cnfgnn.data.loaders import load_dataset

    return int(load_dataset(json.loads(dataset_json), windows=False).num_nodes)


# ---------------------------------------------------------------------- child: measuring
class SendLog:
    """Engine wrapper that logs every ``send``: type, split, clients, start and end time."""

    def __init__(self, engine: Any, trace: Path | None = None):
        self.engine = engine
        self.trace = trace  # a line per send start and end (the parent reads it if it stops us)
        self.events: list[tuple[str, str | None, int, float, float, float, float]] = []

    def client_ids(self) -> list[int]:
        return self.engine.client_ids()

    def send(self, message_type: str, payloads: dict[int, P.Payload]) -> dict[int, Any]:
        split = next((str(p[P.SPLIT]) for p in payloads.values() if P.SPLIT in p), None)
        self._trace(message_type, split, "start")
        t0, c0 = time.perf_counter(), time.process_time()
        replies = self.engine.send(message_type, payloads)
        self.events.append(
            (message_type, split, len(payloads), t0, time.perf_counter(), c0, time.process_time())
        )
        self._trace(message_type, split, "end")
        return replies

    def _trace(self, message_type: str, split: str | None, edge: str) -> None:
        if self.trace is not None:
            with open(self.trace, "a") as f:
                f.write(
                    json.dumps(
                        {"t": time.time(), "type": message_type, "split": split, "edge": edge}
                    )
                    + "\n"
                )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def rounds(self) -> list[dict[str, Any]]:
        """Per round (a ``train.local`` send up to the end of the next validation
        ``evaluate``): wall seconds, round trips and messages, by message type."""
        out = []
        starts = [i for i, e in enumerate(self.events) if e[0] == P.LOCAL_TRAIN]
        for i in starts:
            end = next(
                (
                    j
                    for j in range(i, len(self.events))
                    if self.events[j][0] == P.EVALUATE and self.events[j][1] == P.VAL
                ),
                None,
            )
            if end is None:
                continue
            span = self.events[i : end + 1]
            trips: dict[str, int] = {}
            for e in span:
                trips[e[0]] = trips.get(e[0], 0) + 1
            out.append(
                {
                    "seconds": self.events[end][4] - self.events[i][3],
                    "cpu_seconds_process": self.events[end][6] - self.events[i][5],
                    "round_trips": len(span),
                    "messages": sum(e[2] for e in span),
                    "round_trips_by_type": trips,
                    "transport_seconds": sum(e[4] - e[3] for e in span),
                }
            )
        return out


def _diff(cur: dict[str, Any], prev: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cur.items():
        if isinstance(v, dict):
            d = _diff(v, prev.get(k, {}))
            if any(x for x in d.values()):
                out[k] = d
        else:
            out[k] = v - prev.get(k, 0)
    return out


def _per_round_records(run_dir: Path, log: SendLog) -> list[dict[str, Any]]:
    """metrics.jsonl + the send log -> one record per measured round."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    trips = log.rounds()
    prev_bytes: dict[str, Any] = {}
    prev_wire: dict[str, Any] = {}
    out = []
    for rec, tr in zip(lines, trips):
        cur_bytes = {k: v for k, v in rec.get("bytes", {}).items() if k != "setup"}
        cur_wire = {k: v for k, v in rec.get("wire_bytes", {}).items() if k not in SETUP_TYPES}
        b, w = _diff(cur_bytes, prev_bytes), _diff(cur_wire, prev_wire)
        prev_bytes, prev_wire = cur_bytes, cur_wire
        out.append(
            {
                "round": rec["round"],
                "seconds": tr["seconds"],
                "cpu_seconds_process": tr["cpu_seconds_process"],
                "seconds_by_phase": {k: v for k, v in rec.get("seconds", {}).items() if v},
                "round_trips": tr["round_trips"],
                "messages": tr["messages"],
                "round_trips_by_type": tr["round_trips_by_type"],
                "bytes": b,
                "bytes_total": int(sum(sum(v.values()) for v in b.values())),
                "wire_bytes": w,
                "wire_bytes_total": int(sum(sum(v.values()) for v in w.values())) if w else None,
                **{k: rec.get(k) for k in ("train_loss", "split_loss", "val_loss", "val_rmse")},
            }
        )
    return out


def _inplace_matmul_flops(
    self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of ``out.addmm_(a, b)`` / ``out.baddbmm_(a, b)`` (2 per multiply-add, as
    FlopCounterMode counts their out-of-place forms): it counts nothing for them."""
    return 2 * math.prod(a_shape) * int(b_shape[-1])


def flop_counter() -> Any:
    """A :class:`FlopCounterMode` (not printing) that also counts ``addmm_``/``baddbmm_``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    inplace = {aten.addmm_: _inplace_matmul_flops, aten.baddbmm_: _inplace_matmul_flops}
    return FlopCounterMode(display=False, custom_mapping=inplace)


def _count_central_round(cfg: Any, data: Any, device: Any) -> dict[str, Any]:
    """FLOPs (matmul-like, :class:`FlopCounterMode`, with the in-place ``addmm_`` and
    ``baddbmm_`` that the GRU backward uses counted too) and aten ops of one central round.

    Returns:
        ``flops`` (total), ``flops_by_op`` (op name, e.g. ``aten.bmm`` -> FLOPs: the
        calibration's weights) and ``ops`` (aten ops dispatched).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from cnfgnn.bench.central_limit import CentralCNFGNN

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.ops += 1
            return func(*args, **(kwargs or {}))

    model = CentralCNFGNN(cfg, data, device)
    flops = flop_counter()
    ops = OpCounter()
    with flops, ops:
        model.round(1)
    by_op = flops.get_flop_counts().get("Global", {})
    return {
        "flops": float(flops.get_total_flops()),
        "flops_by_op": {str(op): float(v) for op, v in by_op.items()},
        "ops": float(ops.ops),
    }


def run_case(
    cfg: Any, case: dict[str, Any], run_dir: Path, count_flops: bool = False
) -> dict[str, Any]:
    """Measure one case in this process; returns its JSON record (no memory figures)."""
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.data.nodes import client_groups
    from cnfgnn.data.windows import split_starts
    from cnfgnn.device import resolve_device
    from cnfgnn.experiment import build_workers

    machine.apply(cfg)  # threads (null = all cores), progress
    device = resolve_device(str(cfg.device))
    t_start = time.perf_counter()
    data = load_dataset(cfg.dataset)
    rec: dict[str, Any] = {
        "engine": case["engine"],
        "device": str(device),
        "nodes": data.num_nodes,
        "nodes_per_client": int(cfg.federation.nodes_per_client),
        "clients": 1 if case["engine"] == "central" else len(client_groups(cfg, data)),
        "server_batches_per_trip": int(cfg.federation.server_batches_per_trip),
    }
    split = cfg.dataset.split
    rec["windows"] = {
        k: len(v)
        for k, v in split_starts(
            data.num_steps,
            int(cfg.dataset.in_steps),
            int(cfg.dataset.out_steps),
            split.train,
            split.val,
            split.test,
        ).items()
    }
    rounds = int(cfg.federation.rounds)
    if case["engine"] == "central":
        from cnfgnn.bench.central_limit import CentralCNFGNN

        model = CentralCNFGNN(cfg, data, device)
        per_round = []
        for r in range(1, rounds + 1):
            before = dict(model.seconds)
            t0, c0 = time.perf_counter(), time.process_time()
            losses = model.round(r)
            per_round.append(
                {
                    "round": r,
                    "seconds": time.perf_counter() - t0,
                    "cpu_seconds_process": time.process_time() - c0,
                    "seconds_by_phase": {
                        k: v - before.get(k, 0.0) for k, v in model.seconds.items()
                    },
                    "round_trips": 0,
                    "messages": 0,
                    "bytes_total": 0,
                    **losses,
                }
            )
        rec["rounds"] = per_round
        if count_flops:
            rec["count"] = _count_central_round(cfg, data, device)
    else:
        from cnfgnn.federation.rounds import Orchestrator, ServerGraph
        from cnfgnn.results import RunWriter

        holder: dict[str, SendLog] = {}

        def wrap(engine: Any) -> SendLog:
            holder["log"] = SendLog(engine, run_dir.parent / f"{case['name']}.trace.jsonl")
            return holder["log"]

        if case["engine"] == "inprocess":
            from cnfgnn.federation.engines import local_engine

            local = local_engine(cfg, build_workers(cfg, data, device), device)
            rec["client_processes"] = local.processes
            log = wrap(local)
            writer = RunWriter(cfg, run_dir)
            graph = ServerGraph.from_data(data)
            try:
                final = Orchestrator(
                    cfg, log, graph, writer, lambda s: print(s, flush=True), device
                ).run()
            finally:
                local.close()
        elif case["engine"] == "simulation":
            from cnfgnn.flower.simulation import run_simulation_experiment

            final, _ = run_simulation_experiment(
                cfg, rec["clients"], run_dir, lambda s: print(s, flush=True), wrap
            )
            log = holder["log"]
        else:
            raise ValueError(
                f"bench case {case['name']}: unknown engine {case['engine']!r}; "
                "use central, inprocess or simulation"
            )
        rec["rounds"] = _per_round_records(run_dir, log)
        rec["test_rmse"] = final.get("test", {}).get("rmse")
        setup = [e for e in log.events if e[0] in SETUP_TYPES]
        rec["setup_seconds"] = (setup[-1][4] - setup[0][3]) if setup else None
    rec["wall_seconds"] = time.perf_counter() - t_start
    rec["max_rss_mb_main"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rec


def run_probe(kind: str, cfg: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """A measurement made before the cases, in its own process with a case's config (its
    threads and device): ``calibration`` (:func:`cnfgnn.bench.calibrate.calibrate`) or
    ``message_overhead`` (:func:`cnfgnn.bench.overhead.measure_message_overhead`);
    ``settings`` is the matching ``bench.*`` section."""
    from cnfgnn.data.loaders import load_dataset
    from cnfgnn.device import resolve_device

    machine.apply(cfg)  # the case's threads: the calibration must run at the same setting
    device = resolve_device(str(cfg.device))
    data = load_dataset(cfg.dataset)
    if kind == "calibration":
        from cnfgnn.bench.calibrate import calibrate

        edges = int(np.count_nonzero(data.adjacency))  # the GN's edges (GraphServer.graph)
        return calibrate(cfg, data.num_nodes, edges, settings, device)
    if kind == "message_overhead":
        from cnfgnn.bench.overhead import measure_message_overhead

        return measure_message_overhead(cfg, data, device, settings)
    raise ValueError(f"unknown bench probe {kind!r}; use calibration or message_overhead")


def child_main(spec_path: str) -> None:
    """``python -m cnfgnn.bench.engines --child <spec.json>``: run one case (or the probe
    named by the spec's ``kind``), write its JSON."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = OmegaConf.create(spec["cfg"])
    kind = spec.get("kind", "case")
    try:
        if kind == "case":
            rec = run_case(cfg, spec["case"], Path(spec["run_dir"]), bool(spec.get("count_flops")))
        else:
            rec = run_probe(kind, cfg, spec.get("settings") or {})
        rec["status"] = "ok"
    except BaseException as exc:  # the parent records what broke
        import traceback

        traceback.print_exc()
        rec = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    Path(spec["result"]).write_text(json.dumps(rec, default=float))


# ---------------------------------------------------------------------- parent: cases
def _tree(proc: Any) -> list[Any]:
    try:
        return [proc] + proc.children(recursive=True)
    except Exception:  # noqa: BLE001 - the process just ended
        return []


def run_subprocess(
    spec: dict[str, Any],
    work: Path,
    sample_s: float,
    timeout_s: float,
    memory_limit_gb: float,
    settle: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one case in a child process; sample its process tree's resident memory.

    The child and every process it starts (Ray's) are recorded by PID and creation time; a
    case past ``timeout_s`` or ``memory_limit_gb`` is stopped, and whatever it left running
    is stopped too, by those PIDs only. ``settle`` (``bench.settle``): first wait for the
    load average to fall (:func:`cnfgnn.machine.settle_load`).
    """
    import psutil

    name = spec["case"]["name"]
    waited = 0.0
    if settle is not None and float(settle["timeout_s"]) > 0:
        if os.getloadavg()[0] > float(settle["load"]):
            print(
                f"[bench] {name}: waiting up to {float(settle['timeout_s']):g} s for the load "
                f"average ({os.getloadavg()[0]:.2f}) to fall to {float(settle['load']):g}",
                file=sys.stderr,
                flush=True,
            )
        waited = machine.settle_load(
            float(settle["load"]), float(settle["timeout_s"]), float(settle["poll_s"])
        )
    spec_path, result = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec["result"] = str(result)
    spec_path.write_text(json.dumps(spec))
    env = os.environ | flower_environment()
    env.setdefault("MPLBACKEND", "Agg")
    load_before = os.getloadavg()
    t0, t_wall0 = time.perf_counter(), time.time()
    ticks_before = machine.cpu_ticks()
    procs = ProcessSet(work, env)
    proc = procs.start(
        name,
        [sys.executable, "-m", "cnfgnn.bench.engines", "--child", str(spec_path)],
        cwd=Path.cwd(),
    ).popen
    ps = psutil.Process(proc.pid)
    seen: dict[int, float] = {}  # pid -> create_time of every process of the case
    cpu: dict[int, float] = {}  # pid -> last observed user + system seconds
    peak = peak_main = 0
    stopped = None
    try:
        while proc.poll() is None:
            tree = _tree(ps)
            rss = 0
            for p in tree:
                try:
                    seen.setdefault(p.pid, p.create_time())
                    m = p.memory_info().rss
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    continue
                rss += m
                if p.pid == proc.pid:
                    peak_main = max(peak_main, m)
            peak = max(peak, rss)
            if rss > memory_limit_gb * 2**30:
                stopped = (
                    f"resident memory {rss / 2**30:.1f} GB > bench memory limit "
                    f"{memory_limit_gb} GB"
                )
            elif time.perf_counter() - t0 > timeout_s:
                stopped = f"still running after {timeout_s:g} s"
            if stopped:
                procs.kill(name)
                break
            time.sleep(sample_s)
        proc.wait()
    finally:
        procs.stop_all(grace_s=0.0)  # the case's process group
        for pid, created in seen.items():  # leftovers of this case only (e.g. Ray daemons)
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.is_running():
                    p.kill()
            except psutil.Error:
                pass
    rec = json.loads(result.read_text()) if result.exists() else {"status": "failed"}
    if stopped:
        rec.update(status="stopped", error=stopped)
        trace = work / f"{name}.trace.jsonl"
        if trace.exists():  # what the orchestrator was doing: the last sends
            lines = [json.loads(x) for x in trace.read_text().splitlines()[-6:]]
            rec["last_sends"] = [{**x, "t": round(x["t"] - t_wall0, 1)} for x in lines]
        rec["stopped_after_s"] = time.perf_counter() - t0
    elif proc.returncode and rec.get("status") == "ok":
        rec["status"] = f"exit {proc.returncode}"
    rec["peak_rss_mb_tree"] = peak / 2**20
    rec["peak_rss_mb_main_sampled"] = peak_main / 2**20
    rec["processes"] = len(seen)
    rec["cpu_seconds_tree"] = sum(cpu.values())  # whole case (startup, setup, test too)
    rec["load_avg_before"] = [round(x, 2) for x in load_before]
    rec["settle_wait_s"] = round(waited, 1)
    rec["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    steal = machine.steal_fraction(ticks_before, machine.cpu_ticks())
    rec["cpu_steal_fraction"] = None if steal is None else round(steal, 3)  # the hypervisor's share
    rec["log"] = str(work / f"{name}.log")
    return rec


def _mean(rounds: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _add(acc: dict[str, Any], d: dict[str, Any], w: float) -> dict[str, Any]:
    for k, v in d.items():
        acc[k] = _add(acc.get(k, {}), v, w) if isinstance(v, dict) else acc.get(k, 0.0) + w * v
    return acc


def _mean_dict(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean over rounds of a (nested) dict of numbers (missing entries count as 0)."""
    acc: dict[str, Any] = {}
    for r in rounds:
        _add(acc, r.get(key) or {}, 1.0 / max(len(rounds), 1))
    return acc


def summarise(rec: dict[str, Any]) -> dict[str, Any]:
    """Means over the measured rounds, next to the per-round records."""
    rounds = rec.get("rounds") or []
    if not rounds:
        return rec
    rec["per_round"] = {
        "seconds": _mean(rounds, "seconds"),
        "cpu_seconds_process": _mean(rounds, "cpu_seconds_process"),
        "seconds_by_phase": _mean_dict(rounds, "seconds_by_phase"),
        "round_trips": _mean(rounds, "round_trips"),
        "messages": _mean(rounds, "messages"),
        "bytes_total": _mean(rounds, "bytes_total"),
        "bytes": _mean_dict(rounds, "bytes"),
        "wire_bytes_total": _mean(rounds, "wire_bytes_total"),
        **{k: rounds[-1].get(k) for k in ("train_loss", "split_loss", "val_loss", "val_rmse")},
    }
    return rec


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def projection(cfg: DictConfig, cases: dict[str, Any], windows: dict[str, int]) -> dict[str, Any]:
    """Scale each case's measured phases to a METR-LA-sized round (training phases by the
    training windows, validation by the validation windows) and to full trainings.

    A projection, not a measurement: it assumes every phase is linear in its windows (true
    of local training, encoding, split steps, embedding and validation) and ignores the
    graph's size difference (edges) between the benchmark network and the target.
    """
    pc = cfg.bench.projection
    f_train = float(pc.train_windows) / windows["train"]
    f_val = float(pc.val_windows) / max(windows["val"], 1)
    fed = cfg.federation
    steps = math.ceil(pc.train_windows / fed.server_batch_size) * int(fed.server_epochs)
    what = (
        f"a {pc.name}-sized CNFGNN round ({pc.num_nodes} nodes, {pc.train_windows} "
        f"training windows, R_s={fed.server_epochs}: {steps} server steps), scaled "
        "linearly from this benchmark's phases; a projection, not a measurement"
    )
    out: dict[str, Any] = {"what": what, "scale_train": f_train, "scale_val": f_val, "cases": {}}
    for name, rec in cases.items():
        pr = rec.get("per_round")
        if not pr:
            continue
        phases = pr["seconds_by_phase"]
        accounted = sum(v for k, v in phases.items() if k in ROUND_PHASES_TRAIN + ROUND_PHASES_VAL)
        s = sum(
            v * (f_val if k in ROUND_PHASES_VAL else f_train)
            for k, v in phases.items()
            if k in ROUND_PHASES_TRAIN + ROUND_PHASES_VAL
        )
        s += max(pr["seconds"] - accounted, 0.0) * f_train  # overhead between phases
        out["cases"][name] = {
            "round_seconds": s,
            "round_hours": s / 3600,
            **{f"training_{r}_rounds_days": s * r / 86400 for r in pc.rounds},
        }
    central = cases.get("central", {})
    if central.get("count"):
        c = central["count"]
        t_cpu = central["per_round"]["seconds"]
        gpu = c["flops"] / (float(pc.gpu_sustained_tflops) * 1e12) + c["ops"] * float(
            pc.gpu_seconds_per_op
        )
        out["central_flops_per_round"] = c["flops"]
        out["central_ops_per_round"] = c["ops"]
        out["central_cpu_gflops"] = c["flops"] / t_cpu / 1e9
        gpu_round = gpu * f_train
        out["gpu"] = {
            "what": f"{pc.gpu_name}: the central round's counted FLOPs at "
            f"{pc.gpu_sustained_tflops} TFLOP/s plus {pc.gpu_seconds_per_op:g} s per "
            "tensor op, scaled to the METR-LA round; a projection from CPU counts, "
            "not a GPU measurement",
            "round_seconds": gpu_round,
            **{f"training_{r}_rounds_hours": gpu_round * r / 3600 for r in pc.rounds},
        }
    return out


def run_cases(
    cfg: DictConfig,
    cases: list[dict[str, Any]],
    work: Path,
    extra: dict[str, Any] | None = None,
    memory_limit_gb: float | None = None,
    count_flops: bool = False,
) -> dict[str, Any]:
    """Each case in its own subprocess, one after the other: name -> record."""
    b = cfg.bench
    out = {}
    for case in cases:
        name = case["name"]
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        ccfg = case_config(cfg, case, extra)
        spec = {
            "case": case,
            "cfg": OmegaConf.to_container(ccfg, resolve=True),
            "run_dir": str(work / name),
            "count_flops": count_flops and case["engine"] == "central",
        }
        rec = summarise(
            run_subprocess(
                spec,
                work,
                float(b.sample_interval_s),
                float(b.case_timeout_s),
                float(memory_limit_gb or b.memory_limit_gb),
                b.get("settle"),
            )
        )
        rec["threads"] = thread_setting(ccfg)
        pr = rec.get("per_round") or {}
        print(
            f"[bench] {name}: {rec.get('status')} {pr.get('seconds') or float('nan'):.1f} s/round, "
            f"peak {rec['peak_rss_mb_tree']:.0f} MB {rec.get('error', '')}",
            file=sys.stderr,
            flush=True,
        )
        out[name] = rec
    return out


def thread_setting(ccfg: Any) -> int:
    """Torch intra-op threads a case config runs with (``threads: null``: every core)."""
    return machine.cores() if ccfg.get("threads") is None else int(ccfg.threads)


def run_probe_subprocess(
    cfg: DictConfig, case: dict[str, Any], kind: str, settings: Any, work: Path
) -> dict[str, Any]:
    """:func:`run_probe` in its own subprocess (``case['name']`` names its files), with the
    config of ``case`` and the bench's time and memory limits."""
    b = cfg.bench
    print(f"[bench] {case['name']} ...", file=sys.stderr, flush=True)
    spec = {
        "case": case,
        "kind": kind,
        "settings": OmegaConf.to_container(settings, resolve=True),
        "cfg": OmegaConf.to_container(case_config(cfg, case), resolve=True),
        "run_dir": str(work / case["name"]),
    }
    rec = run_subprocess(
        spec,
        work,
        float(b.sample_interval_s),
        float(b.case_timeout_s),
        float(b.memory_limit_gb),
        b.get("settle"),
    )
    print(
        f"[bench] {case['name']}: {rec.get('status')} {rec.get('seconds') or float('nan'):.1f} s "
        f"{rec.get('error', '')}",
        file=sys.stderr,
        flush=True,
    )
    return rec


def run_calibrations(
    cfg: DictConfig, cases: list[dict[str, Any]], work: Path
) -> dict[str, dict[str, Any]]:
    """One matmul calibration per thread setting among ``cases`` (each in a subprocess with
    the first such case's config): threads (as a string) -> record."""
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        threads = str(thread_setting(case_config(cfg, case)))
        if threads not in out:
            probe = dict(case, name=f"calibration_threads{threads}")
            out[threads] = run_probe_subprocess(
                cfg, probe, "calibration", cfg.bench.calibration, work
            )
    return out


def merge_calibrations(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Several calibrations (each: threads -> record) as one record per thread setting.

    Each shape counts at its fastest calibration (that calibration's median block); every
    calibration's rate stays in the shape's ``gflops_runs``, and each calibration's status,
    seconds, load and log in ``runs``. This machine's matmul speed drifts by up to a third
    within minutes (docs/results/2026-12-04-night-flop-count-and-flower-state.md): a
    calibration at a slow moment would lower the limit and raise every ``flop_fraction``;
    the fastest one is the least disturbed.
    """
    out: dict[str, dict[str, Any]] = {}
    for threads in dict.fromkeys(t for run in runs for t in run):
        recs = [run[threads] for run in runs if threads in run]
        ok = [r for r in recs if r.get("status") == "ok" and r.get("shapes")]
        merged = dict(ok[0] if ok else recs[-1])
        merged["runs"] = [
            {k: r.get(k) for k in ("status", "seconds", "load_avg_before", "log")} for r in recs
        ]
        if ok:
            shapes = {}
            for name in ok[0]["shapes"]:
                got = [r["shapes"][name] for r in ok if name in r["shapes"]]
                fastest = max(got, key=lambda shape: float(shape["gflops"]))
                shapes[name] = dict(fastest, gflops_runs=[float(g["gflops"]) for g in got])
            merged["shapes"] = shapes
        out[threads] = merged
    return out


def cpu_limit(
    cases: dict[str, Any], calibrations: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """How close each case is to this CPU's matmul limit (:mod:`cnfgnn.bench.calibrate`).

    The central case's count (``bench.count_flops``) gives the round's useful FLOPs and
    their split by op; each calibration's ``sustained`` figure weights its shapes by that
    split; each case gets ``achieved_gflops`` and ``flop_fraction`` at its thread setting.
    """
    from cnfgnn.bench.calibrate import case_limit, sustained

    if not calibrations:
        return None
    count = cases.get("central", {}).get("count") or {}
    flops = count.get("flops")
    by_op: dict[str, float] = count.get("flops_by_op") or {}
    total = sum(by_op.values())
    out: dict[str, Any] = {
        "what": (
            "flop_fraction = the central round's counted FLOPs (FlopCounterMode: matmuls "
            "only, the round's useful work; every case does the same math) / (the case's "
            "round seconds x the sustained fp32 matmul GFLOP/s calibrated at the round's "
            "shapes and the case's threads); sustained weights each op kind by its share "
            "of the counted FLOPs"
        ),
        "central_flops_per_round": flops,
        "flop_shares_by_op": {k: v / total for k, v in by_op.items()} if total else None,
        "calibrations": {},
        "cases": {},
    }
    for threads, rec in calibrations.items():
        ok = rec.get("status") == "ok"
        out["calibrations"][threads] = rec | {
            "sustained": sustained(rec["shapes"], by_op) if ok and by_op else None
        }
    for name, rec in cases.items():
        cal = out["calibrations"].get(str(rec.get("threads"))) or {}
        s_gflops = (cal.get("sustained") or {}).get("gflops")
        seconds = (rec.get("per_round") or {}).get("seconds")
        out["cases"][name] = {
            "threads": rec.get("threads"),
            "round_seconds": seconds,
            "sustained_gflops": s_gflops,
            **case_limit(seconds, flops, s_gflops),
        }
    return out


def _value(rec: Mapping[str, Any] | None, key: str) -> float | None:
    """A case record's per-round figure ``key`` (None when the case failed)."""
    return ((rec or {}).get("per_round") or {}).get(key)


def combine_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per case from ``bench.repeats`` runs of every case (``runs[r][case]``).

    Each case keeps the full record of its median repeat (by seconds per round; the lower
    middle one of an even count), so its phases, losses and memory come from one real run
    (the central case's FLOP count, taken in the first repeat only, is carried over), and
    adds ``repeats``: every repeat's seconds per round, status, CPU steal and start load
    (a disturbed repeat stays visible), and the seconds' mean and sample std. With one
    repeat the record is unchanged but for that block.
    """
    out: dict[str, Any] = {}
    for name in runs[0]:
        recs = [run[name] for run in runs if name in run]
        seconds = [_value(r, "seconds") for r in recs]
        timed = sorted((t, i) for i, t in enumerate(seconds) if t is not None)
        chosen = recs[timed[(len(timed) - 1) // 2][1]] if timed else recs[0]
        counted = next((r["count"] for r in recs if r.get("count")), None)  # the first repeat's
        if counted is not None:
            chosen = chosen | {"count": counted}
        mean, std = mean_std(seconds)
        out[name] = chosen | {
            "repeats": {
                "seconds_per_round": seconds,
                "status": [r.get("status") for r in recs],
                "cpu_steal_fraction": [r.get("cpu_steal_fraction") for r in recs],
                "load_avg_before": [r.get("load_avg_before") for r in recs],
                "mean": mean,
                "std": std,
            }
        }
    return out


def paired_ratio(
    runs: list[dict[str, Any]], a: str, ref: str, key: str = "seconds"
) -> dict[str, Any]:
    """``a``'s per-round ``key`` (seconds, or ``cpu_seconds_process``) / ``ref``'s within each
    repeat (the two ran minutes apart, so a slow spell of the machine affects both less than
    it would a ratio of means).

    Returns ``values`` (one per repeat where both cases ran), their ``median`` (the figure
    the goals are judged on: one disturbed repeat of three does not move it), ``mean`` and
    sample ``std`` (None figures where a case failed in every repeat), and ``cases``:
    ``[a, ref]``."""
    values = []
    for run in runs:
        ta, tr = _value(run.get(a), key), _value(run.get(ref), key)
        if ta and tr:
            values.append(ta / tr)
    mean, std = mean_std(values)
    median = statistics.median(values) if values else None
    return {"values": values, "median": median, "mean": mean, "std": std, "cases": [a, ref]}


def evaluate_goals(
    goals: Any,
    ratios: Mapping[str, Mapping[str, Any]],
    cases: Mapping[str, dict[str, Any]],
    limits: Mapping[str, Any] | None,
    overhead: Mapping[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """Every goal of ``bench.goals`` that this run measured, met or missed.

    ``ratios``: :func:`paired_ratio` records by name. Returns ``label -> {"value",
    "at_most" | "at_least", "met", "steal_max"}`` (a ratio's value is its median, with its
    ``"std"`` over repeats); ``met`` is None when the figure is missing (a failed case);
    ``steal_max`` is the largest CPU steal fraction of any repeat of the goal's cases (None:
    not recorded). Labels: a ratio's name, ``<case> flop_fraction``, ``<case> seconds per
    round``, ``<case> peak memory GB`` and ``message overhead s`` (the worst message type's
    median, against ``bench.message_overhead.goal_s``).
    """
    out: dict[str, dict[str, Any]] = {}

    def steal(*names: str) -> float | None:
        seen = [
            f
            for c in names
            for f in ((cases.get(c) or {}).get("repeats") or {}).get("cpu_steal_fraction") or []
            if f is not None
        ]
        return max(seen) if seen else None

    def put(
        label: str, value: float | None, bound: Any, side: str, steal_max: float | None
    ) -> None:
        b = float(bound)
        met = None if value is None else bool(value <= b if side == "at_most" else value >= b)
        out[label] = {"value": value, side: b, "met": met, "steal_max": steal_max}

    spec: dict[str, Any] = OmegaConf.to_container(goals) if goals is not None else {}  # type: ignore[assignment]
    for label, bound in (spec.get("ratio_at_most") or {}).items():
        if label in ratios:
            put(label, ratios[label]["median"], bound, "at_most", steal(*ratios[label]["cases"]))
            out[label]["std"] = ratios[label]["std"]
    per_case = (limits or {}).get("cases") or {}

    def peak_gb(case: str) -> float | None:
        mb = cases[case].get("peak_rss_mb_tree")
        return None if mb is None else mb / 1024

    figures: dict[str, tuple[str, str, Callable[[str], float | None]]] = {
        "flop_fraction_at_least": (
            "flop_fraction",
            "at_least",
            lambda c: (per_case.get(c) or {}).get("flop_fraction"),
        ),
        "round_seconds_at_most": (
            "seconds per round",
            "at_most",
            lambda c: (cases[c].get("per_round") or {}).get("seconds"),
        ),
        "peak_memory_gb_at_most": ("peak memory GB", "at_most", peak_gb),
    }
    for key, (what, side, value) in figures.items():
        for case, bound in (spec.get(key) or {}).items():
            if case in cases:
                put(f"{case} {what}", value(case), bound, side, steal(case))
    if overhead and overhead.get("status") == "ok" and overhead.get("types"):
        worst = max(t["overhead_s"]["median"] for t in overhead["types"].values())
        probe = overhead.get("cpu_steal_fraction")
        put("message overhead s", worst, overhead["goal_s"], "at_most", probe)
    return out


def goals_summary(goals: Mapping[str, dict[str, Any]], steal_label: float) -> list[str]:
    """One line per goal: ``label: value (at most / at least bound): met | MISSED``, labelled
    ``measured under steal`` when a repeat of its cases lost at least ``steal_label`` of the
    CPU to the hypervisor (``bench.steal_label``): such a verdict is not a result."""
    lines = []
    for label, g in goals.items():
        side = "at_most" if "at_most" in g else "at_least"
        value = "n/a" if g["value"] is None else f"{g['value']:.4g}"
        if g.get("std") is not None:
            value += f" ± {g['std']:.2g}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        line = f"{label}: {value} ({side.replace('_', ' ')} {g[side]:g}): {verdict}"
        if (g.get("steal_max") or 0.0) >= steal_label:
            line += f" [measured under steal: up to {g['steal_max']:.0%} in a repeat]"
        lines.append(line)
    return lines


def bench_engines(cfg: DictConfig, work: Path) -> dict[str, Any]:
    """The engines mode: the calibration and the message overhead first, then the cases of
    ``bench.engines``, their ratios, goals, CPU-limit figures and projections."""
    case_list = [dict(c) for c in OmegaConf.to_container(cfg.bench.engines)]
    names = {c["name"] for c in case_list}
    calibrating = bool(cfg.bench.calibration.enabled)
    calibration_runs = [run_calibrations(cfg, case_list, work)] if calibrating else []
    overhead = None
    if bool(cfg.bench.message_overhead.enabled):
        probe = {"name": "message_overhead", "engine": "inprocess", "nodes_per_client": 1}
        overhead = run_probe_subprocess(
            cfg, probe, "message_overhead", cfg.bench.message_overhead, work
        )
    repeats = int(cfg.bench.get("repeats", 1))
    if repeats < 1:
        raise ValueError(f"bench.repeats={repeats}: run every case at least once")
    runs = []
    for r in range(repeats):
        folder = work if repeats == 1 else work / f"repeat{r + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        if repeats > 1:
            print(f"[bench] repeat {r + 1} of {repeats}", file=sys.stderr, flush=True)
        if calibrating and r > 0 and bool(cfg.bench.calibration.get("per_repeat", False)):
            calibration_runs.append(run_calibrations(cfg, case_list, folder))
        count = bool(cfg.bench.count_flops) and r == 0  # the count does not change
        runs.append(run_cases(cfg, case_list, folder, count_flops=count))
    cases = combine_repeats(runs)
    ratios_repeats, ratios_cpu = {}, {}
    for label, (a, ref) in OmegaConf.to_container(cfg.bench.ratios).items():
        if a not in names or ref not in names:  # a case this run leaves out
            continue
        ratios_repeats[label] = paired_ratio(runs, a, ref)
        if all(cases.get(c, {}).get("engine") in ("central", "inprocess") for c in (a, ref)):
            cpu = paired_ratio(runs, a, ref, "cpu_seconds_process")  # one process: load-robust
            ratios_cpu[label] = cpu["median"]
    windows = next((c["windows"] for c in cases.values() if c.get("windows")), None)
    consistency = {}
    ref = cases.get("central", {}).get("per_round") or {}
    for name, rec in cases.items():
        pr = rec.get("per_round") or {}
        if name != "central" and ref and pr:
            consistency[name] = {
                k: (
                    None
                    if pr.get(k) is None or ref.get(k) is None
                    else abs(pr[k] - ref[k]) / max(abs(ref[k]), 1e-12)
                )
                for k in ("train_loss", "split_loss", "val_loss")
            }
    limits = cpu_limit(cases, merge_calibrations(calibration_runs))
    return {
        "cases": cases,
        "repeats": repeats,
        "ratios": {k: v["median"] for k, v in ratios_repeats.items()},
        "ratios_repeats": ratios_repeats,
        "ratios_cpu_seconds": ratios_cpu,
        "goals": evaluate_goals(cfg.bench.goals, ratios_repeats, cases, limits, overhead),
        "loss_relative_difference_to_central": consistency,
        "cpu_limit": limits,
        "message_overhead": overhead,
        "projection": projection(cfg, cases, windows) if windows else None,
    }


def bench_multibatch(cfg: DictConfig, work: Path) -> dict[str, Any]:
    mb = cfg.bench.multibatch
    out: dict[str, Any] = {
        "note": (
            "server_batches_per_trip=k sends k server batches in one round trip and takes ONE "
            "GN step on their pooled gradient: exactly a server batch of k x server_batch_size "
            "(gradient accumulation of k equal batches, node-mean loss), so 1/k of the round "
            "trips and of the GN optimizer steps per epoch. It is not the same trajectory as k "
            "separate steps (those need h_G from the updated GN for each next batch)."
        ),
        "cases": {},
    }
    for trips in mb.trips:
        cases = [
            dict(c, name=f"{c['name']}_trips{trips}") for c in OmegaConf.to_container(mb.engines)
        ]
        extra = {
            "federation.server_batches_per_trip": int(trips),
            "federation.rounds": int(mb.rounds),
        }
        out["cases"].update(run_cases(cfg, cases, work, extra))
    return out


def bench_scale(cfg: DictConfig, work: Path) -> dict[str, Any]:
    """The in-process engine on large synthetic networks: each run of ``bench.scale.runs``
    (nodes, ``model.gn.grad_chunk``) in its own process under ``bench.scale.memory_limit_gb``;
    a run stopped there records the sends it had reached (what broke first)."""
    sc = cfg.bench.scale
    if str(cfg.dataset.kind) != "synthetic":
        from cnfgnn.shell import UsageError

        raise UsageError(
            f"bench.mode=scale grows the synthetic network; dataset {cfg.dataset.name!r} has a "
            "fixed size. Fix: run it with the default bench (no bench=...)"
        )
    out: dict[str, Any] = {"cases": {}}
    for run in sc.runs:
        n, chunk = int(run.nodes), run.get("grad_chunk")
        name = f"inprocess_{n}" + ("" if chunk is None else f"_chunk{int(chunk)}")
        case = {"name": name, "engine": "inprocess", "nodes_per_client": int(sc.nodes_per_client)}
        extra = {
            "dataset.num_nodes": n,
            "dataset.days": float(sc.days),
            "federation.rounds": int(sc.rounds),
            "model.gn.grad_chunk": None if chunk is None else int(chunk),
        }
        out["cases"].update(
            run_cases(cfg, [case], work, extra, memory_limit_gb=float(sc.memory_limit_gb))
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry: ``cnfgnn-bench [hydra overrides]`` (exit 2 on a bad key)."""
    from cnfgnn.shell import console

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1])
        return 0
    return console("cnfgnn-bench", __doc__, _run, argv)


def _run(argv: list[str]) -> None:
    from cnfgnn.device import resolve_device

    cfg = compose_bench(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(cfg.bench.out_dir) / f"{stamp}_{cfg.bench.mode}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "bench": "cnfgnn-bench",
        "mode": str(cfg.bench.mode),
        "time": stamp,
        "overrides": argv,
        "machine": _machine(),
        "device": str(resolve_device(str(cfg.device))),  # auto: what it picked
        "threads": machine.cores() if cfg.threads is None else int(cfg.threads),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "config": {
            "dataset": str(cfg.dataset.name),
            "nodes": dataset_nodes(cfg.dataset),
            "days": cfg.dataset.get("days"),  # synthetic only (a real dataset has its own)
            "hidden_size": int(cfg.model.hidden_size),
            "batch_size": int(cfg.federation.batch_size),
            "server_batch_size": int(cfg.federation.server_batch_size),
            "local_epochs": int(cfg.federation.local_epochs),
            "server_epochs": int(cfg.federation.server_epochs),
            "rounds": int(cfg.federation.rounds),
            "seed": int(cfg.seed),
        },
    }
    mode = str(cfg.bench.mode)
    runners = {"engines": bench_engines, "multibatch": bench_multibatch, "scale": bench_scale}
    if mode not in runners:
        from cnfgnn.shell import UsageError, did_you_mean

        raise UsageError(
            f"bench.mode={mode!r} is unknown.{did_you_mean(mode, runners)} "
            f"Fix: use one of {sorted(runners)}"
        )
    doc.update(runners[mode](cfg, work))
    doc["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["seconds_total"] = time.perf_counter() - t0
    text = json.dumps(doc, indent=1, default=float)
    (work / "bench.json").write_text(text)
    print(text)
    for line in goals_summary(doc.get("goals") or {}, float(cfg.bench.steal_label)):
        print(f"[bench] goal {line}", file=sys.stderr)
    print(f"[bench] written {work / 'bench.json'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
