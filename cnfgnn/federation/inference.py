"""Federated inference with a trained model (DESIGN.md §5 item 6, paper notes §4.6).

The same exchange as validation, for arbitrary windows named by the time index of their
last input step (``ends``):

1. each client encodes its sensors' windows ending at ``ends`` and sends ``h_c`` up;
2. the server runs the graph network once over the sensors that answered (the subgraph of
   the answered sensors: a silent sensor is left out of the GN's input);
3. ``h_G`` goes down; each client decodes its own forecasts and sends back only those
   (original units). Inputs and targets never leave a client.

Models without a graph embedding (FedAvg, centralized GRU) skip steps 1-2: one round trip.
Sensors that do not answer are reported as missing (DESIGN.md §8); their forecasts are NaN.
Plain Python + PyTorch, no Flower import: any :class:`~cnfgnn.federation.engines.Engine`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cnfgnn.data.errors import bad_input
from cnfgnn.data.nodes import select_nodes
from cnfgnn.data.scaler import Scaler, global_scaler
from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import Engine
from cnfgnn.federation.rounds import FederationError, ServerGraph
from cnfgnn.federation.server import GraphServer

#: Methods whose checkpoint holds one global node model (and, for CNFGNN, the GN).
GLOBAL_MODEL_METHODS = ("cnfgnn", "fedavg", "central")
#: Methods whose nodes keep their own models at home: nothing on the server to forecast with.
PER_NODE_METHODS = ("local", "fmtl", "split_learning", "at_no_fedavg")


@dataclass
class TrainedModel:
    """What inference needs from a run's checkpoint (the best round's parameters).

    Attributes:
        theta: global node model, ``name -> [...]`` (one node's weights).
        gn: graph network weights, or None for models without a graph embedding.
        scaler: the run's global scaler, or None (per-node scaling, or an older
            checkpoint: recomputed from the clients' training statistics).
        graph: fingerprint of the training network (``graph_fingerprint``), or None.
        best_round: round the parameters come from.
        path: the checkpoint file.
    """

    theta: dict[str, np.ndarray]
    gn: dict[str, Any] | None
    scaler: Scaler | None
    graph: dict[str, Any] | None
    best_round: int
    path: Path


def check_method(cfg: Any, source: str | Path) -> None:
    """Raise unless the run's method has a global node model to forecast with."""
    method = str(cfg.federation.method)
    if method not in GLOBAL_MODEL_METHODS and method not in PER_NODE_METHODS:
        raise bad_input(source, f"unknown federation.method={method}",
                        f"forecast with a run of one of {list(GLOBAL_MODEL_METHODS)}")
    if method in PER_NODE_METHODS:
        raise bad_input(
            source, f"federation.method={method} keeps a separate model on every node; the "
            "checkpoint has no global node model, so federated inference is not implemented "
            "for it (the per-node models live only on the nodes of the training run)",
            f"forecast with a run of one of {list(GLOBAL_MODEL_METHODS)}")


def load_trained(path: str | Path, cfg: Any) -> TrainedModel:
    """The best round's node model, GN and scaler from ``checkpoint.pt``.

    Args:
        path: the checkpoint file.
        cfg: the run's config (method and model settings).
    """
    path = Path(path)
    check_method(cfg, path)
    if not path.is_file():
        raise bad_input(path, "checkpoint not found", "train the run first (cnfgnn ...) "
                        "or pass a run directory that holds checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        es = ckpt.get("early_stopping") or {}
        theta = es.get("best_theta", ckpt["theta"])
        server = es.get("best_server", ckpt.get("server"))
    except Exception as exc:  # unreadable, truncated, or not a cnfgnn checkpoint
        raise bad_input(path, f"not a readable cnfgnn checkpoint ({type(exc).__name__}: "
                        f"{exc})", "pass the checkpoint.pt written by a cnfgnn run") from None
    gn = None
    if cfg.model.graph_embedding:
        if not server:
            raise bad_input(path, "the model decodes with a graph embedding but the "
                            "checkpoint holds no graph network", "retrain the run")
        gn = server["gn"] if "gn" in server else server
    sc = ckpt.get("scaler")
    scaler = None if sc is None else Scaler(np.asarray(sc["mean"]), np.asarray(sc["std"]))
    return TrainedModel({k: np.asarray(v) for k, v in theta.items()}, gn, scaler,
                        ckpt.get("graph"), int(es.get("best_round", ckpt.get("round", 0))), path)


@dataclass
class ForecastResult:
    """Forecasts of every sensor for a set of windows.

    Attributes:
        ends: ``[W]`` time index of each window's last input step.
        forecast: ``[W, H, N]`` float32 in original units; NaN for sensors that did not answer.
        sensor_ids: N sensor ids (the graph's order).
        answered: ``[N]`` bool, True for sensors whose forecasts came back.
        missing: one entry per client left out: ``{phase, client, reason, sensors}``.
        seconds: wall time per phase (``setup``, ``encode``, ``server``, ``decode``).
        bytes: payload bytes per phase and direction.
    """

    ends: np.ndarray
    forecast: np.ndarray
    sensor_ids: list[str]
    answered: np.ndarray
    missing: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def missing_sensors(self) -> list[str]:
        return [s for s, ok in zip(self.sensor_ids, self.answered) if not ok]

    def save(self, path: str | Path) -> Path:
        """Write to ``.npz`` (how a Flower ServerApp hands the result to the driver)."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        meta = {"sensor_ids": self.sensor_ids, "missing": self.missing,
                "seconds": self.seconds, "bytes": self.bytes}
        np.savez(tmp, ends=self.ends, forecast=self.forecast, answered=self.answered,
                 meta=np.asarray(json.dumps(meta)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ForecastResult":
        import json

        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            return cls(z["ends"], z["forecast"], meta["sensor_ids"], z["answered"],
                       meta["missing"], meta["seconds"], meta["bytes"])


class Forecaster:
    """The server side of federated inference.

    Args:
        cfg: the run's config (``model``, ``federation``, ``seed``).
        engine: transport to the clients.
        graph: the graph the server holds.
        trained: parameters from the checkpoint.
        device: torch device of the graph network.
        progress: one-line progress sink.
    """

    def __init__(self, cfg: Any, engine: Engine, graph: ServerGraph, trained: TrainedModel,
                 device: torch.device | str = "cpu", progress: Callable[[str], None] = print):
        self.cfg, self.engine, self.graph, self.trained = cfg, engine, graph, trained
        self.progress = progress
        self.uses_gn = bool(cfg.model.graph_embedding)
        self.server: GraphServer | None = None
        if self.uses_gn:
            self.server = GraphServer(cfg.model, lr=float(cfg.federation.server_lr), device=device)
            self.server.gn.load_state_dict(trained.gn)
        self.client_nodes: dict[int, np.ndarray] = {}
        self.missing: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._graphs: dict[bytes, Any] = {}

    # ------------------------------------------------------------------ transport
    def _send(self, phase: str, mtype: str, payloads: dict[int, P.Payload]
              ) -> dict[int, P.Payload]:
        """Send, count bytes and seconds; clients that fail are recorded as missing."""
        for p in payloads.values():
            self.bytes[phase]["down"] += sum(P.payload_nbytes(p))
        t0 = time.perf_counter()
        replies = self.engine.send(mtype, payloads)
        self.seconds[phase] += time.perf_counter() - t0
        ok = {}
        for cid in payloads:
            reply = replies.get(cid, P.ClientFailure("no reply"))
            if isinstance(reply, P.ClientFailure):
                nodes = self.client_nodes.get(cid, np.zeros(0, np.int64))
                self.missing.append({"phase": phase, "client": cid, "reason": reply.reason,
                                     "sensors": [self.graph.sensor_ids[i] for i in nodes]})
                self.progress(f"  client {cid} left out of {phase}: {reply.reason}")
                continue
            self.bytes[phase]["up"] += sum(P.payload_nbytes(reply))
            ok[cid] = reply
        return ok

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Handshake; give every client the scaler and the trained node model."""
        t0 = time.perf_counter()
        hello = self._send("setup", P.HELLO, {c: {} for c in self.engine.client_ids()})
        n = len(self.graph.sensor_ids)
        for c, r in hello.items():
            nodes = np.asarray(r[P.NODES], np.int64)
            ids = str(r[P.SENSOR_IDS]).split(",") if len(nodes) else []
            if len(nodes) and (nodes.min() < 0 or nodes.max() >= n or
                               [self.graph.sensor_ids[i] for i in nodes] != ids):
                raise FederationError(f"client {c} hosts sensors {ids[:5]} that are not at "
                                      f"those positions in the server's graph of {n} sensors")
            self.client_nodes[c] = nodes
        hosted = np.concatenate(list(self.client_nodes.values())) if hello else np.zeros(0)
        if len(np.unique(hosted)) != len(hosted):
            raise FederationError("two clients host the same sensor")
        conf: P.Payload = {}
        if str(self.cfg.federation.scaling) == "global":
            scaler = self.trained.scaler or self._recompute_scaler()
            conf = {P.SCALER_MEAN: np.asarray(scaler.mean, np.float64),
                    P.SCALER_STD: np.asarray(scaler.std, np.float64)}
        conf |= P.weights_to_payload(self.trained.theta)
        self._send("setup", P.CONFIGURE, {c: dict(conf) for c in self.client_nodes})
        self.client_nodes = {c: self.client_nodes[c] for c in self.client_nodes
                             if not any(m["client"] == c for m in self.missing)}
        self.seconds["setup"] = time.perf_counter() - t0  # handshake, scaler, model

    def _recompute_scaler(self) -> Scaler:
        """The training run's global scaler from the training sensors' statistics.

        Equal to the run's when the data are the same (older checkpoints did not store it).
        """
        ratio = self.cfg.federation.inductive_ratio
        n = len(self.graph.sensor_ids)
        train = (np.arange(n) if ratio is None else
                 select_nodes(n, float(ratio), self.graph.locations, seed=int(self.cfg.seed)))
        clients = [c for c, nodes in self.client_nodes.items() if np.isin(nodes, train).all()]
        stats = self._send("setup", P.STATS, {c: {} for c in clients})
        if not stats or len(stats) < len(clients):
            raise FederationError("not every training sensor sent its statistics: the scaler "
                                  "would differ from the run's; retry when all answer")
        return global_scaler([{"sum": r[P.STAT_SUM], "sumsq": r[P.STAT_SUMSQ],
                               "count": r[P.STAT_COUNT]} for r in stats.values()])

    # ------------------------------------------------------------------ inference
    def _subgraph(self, nodes: np.ndarray) -> Any:
        key = nodes.tobytes()
        if key not in self._graphs:
            assert self.server is not None
            self._graphs[key] = self.server.graph(self.graph.adjacency[np.ix_(nodes, nodes)])
        return self._graphs[key]

    def _exchange(self, ends: np.ndarray, out: np.ndarray, got: np.ndarray) -> None:
        """One exchange for a chunk of windows: fills ``out[:, :, node]`` and ``got[node]``."""
        clients = sorted(self.client_nodes)
        payloads: dict[int, P.Payload] = {c: {P.ENDS: ends} for c in clients}
        if self.uses_gn:
            assert self.server is not None
            enc = self._send("encode", P.PREDICT_ENCODE, payloads)
            if not enc:
                raise FederationError("no client answered the encoding request")
            nodes = np.sort(np.concatenate([self.client_nodes[c] for c in enc]))
            col = {int(g): i for i, g in enumerate(nodes)}
            first = next(iter(enc.values()))[P.H_C]
            h_c = np.zeros((len(ends), len(nodes)) + first.shape[2:], np.float32)
            for c, r in enc.items():
                h_c[:, [col[int(g)] for g in self.client_nodes[c]]] = r[P.H_C]
            t0 = time.perf_counter()
            h_g = self.server.embed_all(h_c, self._subgraph(nodes),
                                        int(self.cfg.federation.server_eval_batch_size))
            self.seconds["server"] += time.perf_counter() - t0
            payloads = {c: {P.ENDS: ends, P.H_G: np.ascontiguousarray(
                h_g[:, [col[int(g)] for g in self.client_nodes[c]]])} for c in enc}
        dec = self._send("decode", P.PREDICT, payloads)
        for c, r in dec.items():
            nodes = self.client_nodes[c]
            out[:, :, nodes] = r[P.FORECAST]
            got[nodes] = True

    def forecast(self, ends: np.ndarray | list[int]) -> ForecastResult:
        """Forecasts of every sensor for the windows ending at ``ends``.

        Windows go ``federation.eval_batch_size`` at a time (one exchange each). A sensor
        counts as answered when its forecasts came back for every window.

        Args:
            ends: ``[W]`` time indices of the windows' last input steps.
        """
        if not self.client_nodes:
            self.setup()
        ends = np.asarray(ends, dtype=np.int64).reshape(-1)
        n = len(self.graph.sensor_ids)
        horizon = int(self.cfg.model.horizon)
        out = np.full((len(ends), horizon, n), np.nan, np.float32)
        answered = np.zeros(n, bool)
        for c in self.client_nodes.values():
            answered[c] = True
        bs = max(int(self.cfg.federation.eval_batch_size), 1)
        for b in range(0, len(ends), bs):
            got = np.zeros(n, bool)
            self._exchange(ends[b : b + bs], out[b : b + bs], got)
            answered &= got
        if not answered.any():
            raise FederationError("no sensor answered the forecast request")
        out[:, :, ~answered] = np.nan
        return ForecastResult(ends, out, list(self.graph.sensor_ids), answered,
                              list(self.missing), dict(self.seconds),
                              {k: dict(v) for k, v in self.bytes.items()})
