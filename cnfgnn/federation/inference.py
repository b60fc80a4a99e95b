"""Federated inference with a trained model (docs/design.md §5 item 6, docs/method.md §4.6).

The same exchange as validation, for arbitrary windows named by the time index of their
last input step (``ends``):

1. each client encodes its sensors' windows ending at ``ends`` and sends ``h_c`` up;
2. the server runs the graph network once over the sensors that answered (the subgraph of
   the answered sensors: a silent sensor is left out of the GN's input);
3. ``h_G`` goes down; each client decodes its own forecasts and sends back only those
   (original units). Inputs and targets never leave a client.

Models without a graph embedding (FedAvg, centralized GRU) skip steps 1-2: one round trip.
Sensors that do not answer are reported as missing (docs/design.md §8); their forecasts are NaN.

Robustness (docs/robustness.md): ``forecast(ends, silent=..., noise=...)`` silences chosen
sensors (they
send nothing: the server neither receives their ``h_c`` nor sends them ``h_G``) and adds
Gaussian noise to the inputs on every node. Silent sensors still get a forecast, made on the
server without any of their current data (:meth:`Forecaster._fallback`):

* global node model (CNFGNN, FedAvg): the server runs the global node model on an input
  window that holds none of the sensor's current data: its training mean (from the STATS
  sums every sensor sends at setup, as for the scaler; the scaler mean if it sent none) at
  every step, with the true time of day; with a graph embedding, the silent node's
  ``h_G`` comes from a second GN pass over the answering nodes plus the silent ones (their
  ``h_c`` = that placeholder encoding), so it carries its answering neighbours' encodings.
  The answering nodes keep the ``h_G`` of the GN over their own subgraph (silent nodes
  left out, docs/design.md §5 item 6);
* per-node models (GRU local): there is no shared model, so a silent sensor is forecast as
  its historical training mean (from the STATS sums it sent at setup, as for the scaler).

Plain Python + PyTorch, no Flower import: any :class:`~cnfgnn.federation.engines.Engine`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnfgnn.data.errors import bad_input
from cnfgnn.data.nodes import select_nodes
from cnfgnn.data.scaler import Scaler, global_scaler
from cnfgnn.federation import protocol as P
from cnfgnn.federation.engines import Engine
from cnfgnn.federation.exchange import exchange
from cnfgnn.federation.rounds import FederationError, ServerGraph
from cnfgnn.federation.server import GraphServer
from cnfgnn.federation.validate import (
    DEFAULT_REPLY_MAX_ABS,
    ReplyLimits,
    check_reply,
)
from cnfgnn.models.node_seq2seq import build_node_model

log = logging.getLogger(__name__)

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
    per_node: bool = False


def check_method(cfg: Any, source: str | Path, per_node_ok: bool = False) -> None:
    """Raise unless the run's method has a global node model to forecast with.

    ``per_node_ok``: also accept per-node methods (each node forecasts with the model it kept
    in its own store, see :class:`~cnfgnn.federation.node.NodeWorker`).
    """
    method = str(cfg.federation.method)
    if per_node_ok and method in PER_NODE_METHODS:
        if bool(cfg.model.graph_embedding):
            raise bad_input(
                source,
                f"federation.method={method} with a graph embedding: the "
                "GN of a per-node run is not evaluated here",
                "evaluate cnfgnn, fedavg, central or local (GRU) runs",
            )
        return
    if method not in GLOBAL_MODEL_METHODS and method not in PER_NODE_METHODS:
        raise bad_input(
            source,
            f"unknown federation.method={method}",
            f"forecast with a run of one of {list(GLOBAL_MODEL_METHODS)}",
        )
    if method in PER_NODE_METHODS:
        raise bad_input(
            source,
            f"federation.method={method} keeps a separate model on every node; the "
            "checkpoint has no global node model, so federated inference is not implemented "
            "for it (the per-node models live only on the nodes of the training run)",
            f"forecast with a run of one of {list(GLOBAL_MODEL_METHODS)}",
        )


def load_trained(path: str | Path, cfg: Any, per_node_ok: bool = False) -> TrainedModel:
    """The best round's node model, GN and scaler from ``checkpoint.pt``.

    Args:
        path: the checkpoint file.
        cfg: the run's config (method and model settings).
        per_node_ok: accept per-node methods (``theta`` is then empty: the nodes load
            their own kept models).
    """
    path = Path(path)
    check_method(cfg, path, per_node_ok)
    if not path.is_file():
        raise bad_input(
            path,
            "checkpoint not found",
            "train the run first (cnfgnn ...) or pass a run directory that holds checkpoint.pt",
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        es = ckpt.get("early_stopping") or {}
        theta = es.get("best_theta", ckpt["theta"])
        server = es.get("best_server", ckpt.get("server"))
    except Exception as exc:  # unreadable, truncated, or not a cnfgnn checkpoint
        raise bad_input(
            path,
            f"not a readable cnfgnn checkpoint ({type(exc).__name__}: {exc})",
            "pass the checkpoint.pt written by a cnfgnn run",
        ) from None
    gn = None
    if cfg.model.graph_embedding:
        if not server:
            raise bad_input(
                path,
                "the model decodes with a graph embedding but the "
                "checkpoint holds no graph network",
                "retrain the run",
            )
        gn = server["gn"] if "gn" in server else server
    sc = ckpt.get("scaler")
    scaler = None if sc is None else Scaler(np.asarray(sc["mean"]), np.asarray(sc["std"]))
    per_node = str(cfg.federation.method) in PER_NODE_METHODS
    return TrainedModel(
        {} if per_node else {k: np.asarray(v) for k, v in theta.items()},
        gn,
        scaler,
        ckpt.get("graph"),
        int(es.get("best_round", ckpt.get("round", 0))),
        path,
        per_node,
    )


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
        silent: ``[N]`` bool, sensors silenced on purpose (robustness): they sent nothing and
            their forecasts come from ``fallback``.
        fallback: how silent sensors were forecast (``global_model+gn``, ``global_model`` or
            ``historical_mean``); empty when none was silent.
    """

    ends: np.ndarray
    forecast: np.ndarray
    sensor_ids: list[str]
    answered: np.ndarray
    missing: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    silent: np.ndarray | None = None
    fallback: str = ""

    @property
    def missing_sensors(self) -> list[str]:
        """Sensors without a forecast from their node (silenced ones included)."""
        return [s for s, ok in zip(self.sensor_ids, self.answered) if not ok]

    @property
    def forecast_mask(self) -> np.ndarray:
        """``[N]`` bool: sensors with a forecast (answered, or silenced and forecast by the
        fallback)."""
        return self.answered | (self.silent if self.silent is not None else False)

    @property
    def silent_sensors(self) -> list[str]:
        """Sensors silenced on purpose (forecast by ``fallback``)."""
        if self.silent is None:
            return []
        return [s for s, off in zip(self.sensor_ids, self.silent) if off]

    def save(self, path: str | Path) -> Path:
        """Write to ``.npz`` (how a Flower ServerApp hands the result to the driver)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        meta = {
            "sensor_ids": self.sensor_ids,
            "missing": self.missing,
            "seconds": self.seconds,
            "bytes": self.bytes,
            "fallback": self.fallback,
            "silent": None if self.silent is None else self.silent.tolist(),
        }
        np.savez(
            tmp,
            ends=self.ends,
            forecast=self.forecast,
            answered=self.answered,
            meta=np.asarray(json.dumps(meta)),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ForecastResult:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            silent = meta.get("silent")
            return cls(
                z["ends"],
                z["forecast"],
                meta["sensor_ids"],
                z["answered"],
                meta["missing"],
                meta["seconds"],
                meta["bytes"],
                None if silent is None else np.asarray(silent, bool),
                meta.get("fallback", ""),
            )


class Forecaster:
    """The server side of federated inference.

    Args:
        cfg: the run's config (``model``, ``federation``, ``seed``).
        engine: transport to the clients.
        graph: the graph the server holds.
        trained: parameters from the checkpoint.
        device: torch device of the graph network.
        progress: one-line progress sink.
        clock: ``[T]`` time of day of every step (the server's clock, no sensor data); needed
            to forecast silent sensors with the global node model.
    """

    def __init__(
        self,
        cfg: Any,
        engine: Engine,
        graph: ServerGraph,
        trained: TrainedModel,
        device: torch.device | str = "cpu",
        progress: Callable[[str], None] = log.info,
        clock: np.ndarray | None = None,
    ):
        self.cfg, self.engine, self.graph, self.trained = cfg, engine, graph, trained
        self.progress = progress
        self.device = torch.device(device)
        self.clock = None if clock is None else np.asarray(clock, np.float32)
        self.scaler: Scaler | None = None  # global scaling only
        self.hist_mean: np.ndarray | None = None  # [N] training means (setup, STATS)
        self._models: dict[int, Any] = {}
        self.uses_gn = bool(cfg.model.graph_embedding)
        self.server: GraphServer | None = None
        if self.uses_gn:
            self.server = GraphServer(cfg.model, lr=float(cfg.federation.server_lr), device=device)
            assert trained.gn is not None, "a model with a graph embedding has GN weights"
            self.server.gn.load_state_dict(trained.gn)
        self.client_nodes: dict[int, np.ndarray] = {}
        self.missing: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._graphs: dict[bytes, Any] = {}

    # ------------------------------------------------------------------ transport
    def _send(self, phase: str, mtype: str, payloads: dict[int, P.Payload]) -> dict[int, P.Payload]:
        """Send, count bytes and seconds; clients that fail are recorded as missing."""
        m, fed = self.cfg.model, self.cfg.federation
        limits = ReplyLimits(  # replies checked like training's (cnfgnn.federation.validate)
            num_graph_nodes=len(self.graph.sensor_ids),
            windows={},
            layers=int(m.num_layers),
            hidden=int(m.hidden_size),
            horizon=int(self.cfg.dataset.out_steps),
            weight_shapes={k: tuple(np.shape(v)) for k, v in self.trained.theta.items()},
            max_abs=float(fed.get("reply_max_abs", DEFAULT_REPLY_MAX_ABS)),
        )

        def check(cid: int, request: P.Payload, reply: P.Payload) -> P.Payload:
            k = len(self.client_nodes[cid]) if cid in self.client_nodes else None
            return check_reply(mtype, request, reply, k, limits)

        ex = exchange(self.engine, mtype, payloads, check)
        self.seconds[phase] += ex.seconds
        if payloads:
            self.bytes[phase]["down"] += sum(ex.down)
        if ex.replies:
            self.bytes[phase]["up"] += sum(ex.up)
        for cid, reason in ex.failed.items():
            nodes = self.client_nodes.get(cid, np.zeros(0, np.int64))
            self.missing.append(
                {
                    "phase": phase,
                    "client": cid,
                    "reason": reason,
                    "sensors": [self.graph.sensor_ids[i] for i in nodes],
                }
            )
            self.progress(f"  client {cid} left out of {phase}: {reason}")
        return ex.replies

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Handshake; give every client the scaler and the trained node model."""
        t0 = time.perf_counter()
        hello = self._send("setup", P.HELLO, {c: {} for c in self.engine.client_ids()})
        n = len(self.graph.sensor_ids)
        for c, r in hello.items():
            nodes = np.asarray(r[P.NODES], np.int64)
            ids = str(r[P.SENSOR_IDS]).split(",") if len(nodes) else []
            if len(nodes) and (
                nodes.min() < 0
                or nodes.max() >= n
                or [self.graph.sensor_ids[i] for i in nodes] != ids
            ):
                raise FederationError(
                    f"client {c} hosts sensors {ids[:5]} that are not at "
                    f"those positions in the server's graph of {n} sensors"
                )
            self.client_nodes[c] = nodes
        hosted = np.concatenate(list(self.client_nodes.values())) if hello else np.zeros(0)
        if len(np.unique(hosted)) != len(hosted):
            raise FederationError("two clients host the same sensor")
        conf: P.Payload = {}
        if str(self.cfg.federation.scaling) == "global":
            scaler = self.trained.scaler or self._recompute_scaler()
            conf = {
                P.SCALER_MEAN: np.asarray(scaler.mean, np.float64),
                P.SCALER_STD: np.asarray(scaler.std, np.float64),
            }
            self.scaler = scaler
        conf |= P.weights_to_payload(self.trained.theta)
        if self.trained.per_node:  # each node loads the model it kept at home
            conf[P.OWN_MODEL] = True
        self.hist_mean = self.training_means()  # the silent-sensor fallback's level
        self._send("setup", P.CONFIGURE, {c: dict(conf) for c in self.client_nodes})
        self.client_nodes = {
            c: self.client_nodes[c]
            for c in self.client_nodes
            if not any(m["client"] == c for m in self.missing)
        }
        self.seconds["setup"] = time.perf_counter() - t0  # handshake, scaler, model

    def training_means(self) -> np.ndarray:
        """``[N]`` each sensor's training mean from the STATS sums (NaN where none came)."""
        means = np.full(len(self.graph.sensor_ids), np.nan)
        stats = self._send("setup", P.STATS, {c: {} for c in self.client_nodes})
        for c, r in stats.items():
            cnt = np.asarray(r[P.STAT_COUNT], np.float64)
            means[self.client_nodes[c]] = np.asarray(r[P.STAT_SUM]) / np.maximum(cnt, 1.0)
        return means

    def _recompute_scaler(self) -> Scaler:
        """The training run's global scaler from the training sensors' statistics.

        Equal to the run's when the data are the same (older checkpoints did not store it).
        """
        ratio = self.cfg.federation.inductive_ratio
        n = len(self.graph.sensor_ids)
        train = (
            np.arange(n)
            if ratio is None
            else select_nodes(n, float(ratio), self.graph.locations, seed=int(self.cfg.seed))
        )
        clients = [c for c, nodes in self.client_nodes.items() if np.isin(nodes, train).all()]
        stats = self._send("setup", P.STATS, {c: {} for c in clients})
        if not stats or len(stats) < len(clients):
            raise FederationError(
                "not every training sensor sent its statistics: the scaler "
                "would differ from the run's; retry when all answer"
            )
        return global_scaler(
            [
                {"sum": r[P.STAT_SUM], "sumsq": r[P.STAT_SUMSQ], "count": r[P.STAT_COUNT]}
                for r in stats.values()
            ]
        )

    # ------------------------------------------------------------------ inference
    def _subgraph(self, nodes: np.ndarray) -> Any:
        key = nodes.tobytes()
        if key not in self._graphs:
            assert self.server is not None
            self._graphs[key] = self.server.graph(self.graph.adjacency[np.ix_(nodes, nodes)])
        return self._graphs[key]

    def _exchange(
        self,
        ends: np.ndarray,
        out: np.ndarray,
        got: np.ndarray,
        silent: np.ndarray,
        noise: float = 0.0,
    ) -> None:
        """One exchange for a chunk of windows: fills ``out[:, :, node]`` and ``got[node]``.

        Silent sensors (``silent`` ``[N]`` bool) take no part: a client hosting only silent
        sensors is not contacted, and the columns of silent sensors in a mixed client's
        replies are dropped (their ``h_c`` never reaches the GN; their ``h_G`` is zeros and
        their decoded forecasts are discarded). ``noise`` > 0 goes to every node.
        """
        clients = [c for c in sorted(self.client_nodes) if (~silent[self.client_nodes[c]]).any()]
        base: P.Payload = {P.ENDS: ends} | ({P.NOISE: float(noise)} if noise > 0 else {})
        payloads: dict[int, P.Payload] = {c: dict(base) for c in clients}
        self._h_c: tuple[np.ndarray, np.ndarray] | None = None
        if self.uses_gn:
            assert self.server is not None
            enc = self._send("encode", P.PREDICT_ENCODE, payloads) if payloads else {}
            if not enc:
                raise FederationError("no client answered the encoding request")
            nodes = np.sort(np.concatenate([self.client_nodes[c] for c in enc]))
            nodes = nodes[~silent[nodes]]
            col = {int(g): i for i, g in enumerate(nodes)}
            first = next(iter(enc.values()))[P.H_C]
            h_c = np.zeros((len(ends), len(nodes)) + first.shape[2:], np.float32)
            for c, r in enc.items():
                keep = ~silent[self.client_nodes[c]]
                h_c[:, [col[int(g)] for g in self.client_nodes[c][keep]]] = r[P.H_C][:, keep]
            t0 = time.perf_counter()
            h_g = self.server.embed_all(
                h_c, self._subgraph(nodes), int(self.cfg.federation.server_eval_batch_size)
            )
            self.seconds["server"] += time.perf_counter() - t0
            self._h_c = (nodes, h_c)  # the answering nodes' encodings, for the fallback
            payloads = {}
            for c in enc:
                cn = self.client_nodes[c]
                part = np.zeros((len(ends), len(cn)) + h_g.shape[2:], np.float32)
                keep = ~silent[cn]
                part[:, keep] = h_g[:, [col[int(g)] for g in cn[keep]]]
                payloads[c] = base | {P.H_G: part}
        dec = self._send("decode", P.PREDICT, payloads) if payloads else {}
        for c, r in dec.items():
            keep = ~silent[self.client_nodes[c]]
            nodes = self.client_nodes[c][keep]
            out[:, :, nodes] = r[P.FORECAST][:, :, keep]
            got[nodes] = True
        if silent.any():
            out[:, :, silent] = self._fallback(ends, np.flatnonzero(silent))

    # ------------------------------------------------------------------ silent sensors
    def fallback_name(self) -> str:
        """How silent sensors are forecast with this run's model (see the module doc)."""
        if self.trained.per_node:
            return "historical_mean"
        return "global_model+gn" if self.uses_gn else "global_model"

    def _global_model(self, k: int) -> Any:
        """The global node model stacked for ``k`` nodes (server side, no gradients)."""
        if k not in self._models:
            m = self.cfg.model
            model = build_node_model(m, k)
            model.load_global_state(
                {n: torch.from_numpy(np.array(v)) for n, v in self.trained.theta.items()}
            )
            self._models[k] = model.to(self.device).eval()
        return self._models[k]

    @torch.no_grad()
    def _fallback(self, ends: np.ndarray, silent: np.ndarray) -> np.ndarray:
        """Forecasts ``[W, H, S]`` (original units) of silent sensors ``[S]``, on the server.

        Uses nothing the silent sensors sent this time: per-node methods return each one's
        training mean; otherwise the global node model decodes from a window holding that
        training mean at every step (the scaler mean if unknown) with the true time of day,
        and, with a graph embedding, from the h_G
        a GN pass over the answering nodes' encodings plus these placeholders gives them.
        """
        horizon = int(self.cfg.model.horizon)
        if self.trained.per_node:
            assert self.hist_mean is not None
            return np.broadcast_to(
                self.hist_mean[silent].astype(np.float32), (len(ends), horizon, len(silent))
            ).copy()
        if self.scaler is None:
            raise FederationError(
                "silent sensors under federation.scaling=per_node: the server "
                "does not know their scale. Fix: silence sensors only in "
                "runs with federation.scaling=global"
            )
        if self.clock is None:
            raise FederationError(
                "silent sensors need the time of day of each step: pass "
                "clock= (data.time_of_day()) to the Forecaster"
            )
        in_steps, t_len = int(self.cfg.dataset.in_steps), len(self.clock)
        t_in = ends[:, None] + np.arange(1 - in_steps, 1)  # [W, T_in]
        t_out = ends[:, None] + np.arange(1, horizon + 1)  # [W, H]
        step = float(np.median(np.diff(self.clock.astype(np.float64)) % 1.0)) if t_len > 1 else 0.0
        y_tod = np.where(
            t_out < t_len,
            self.clock[np.minimum(t_out, t_len - 1)],
            (self.clock[-1] + (t_out - (t_len - 1)) * step) % 1.0,
        )
        s, dev = len(silent), self.device
        level = np.zeros(s) if self.hist_mean is None else self.hist_mean[silent]
        level = np.nan_to_num(self.scaler.transform(level[None, :])[0], nan=0.0)  # [S] scaled
        x = torch.zeros(len(ends), in_steps, s, 2, device=dev)
        x[..., 0] = torch.as_tensor(level.astype(np.float32), device=dev)
        x[..., 1] = torch.as_tensor(self.clock[t_in], device=dev)[:, :, None]
        y = torch.as_tensor(y_tod.astype(np.float32), device=dev)[:, :, None].expand(-1, -1, s)
        model = self._global_model(s)
        h_c_sil = model.encode(x)  # [W, S, L, H]
        h_g = None
        if self.uses_gn:
            assert self.server is not None and self._h_c is not None
            nodes, h_c = self._h_c
            full = np.concatenate([nodes, silent])
            order = np.argsort(full, kind="stable")
            h_all = np.concatenate([h_c, h_c_sil.cpu().numpy()], axis=1)[:, order]
            t0 = time.perf_counter()
            h_g_all = self.server.embed_all(
                h_all, self._subgraph(full[order]), int(self.cfg.federation.server_eval_batch_size)
            )
            self.seconds["server"] += time.perf_counter() - t0
            pos = {int(g): i for i, g in enumerate(full[order])}
            h_g = torch.as_tensor(
                np.ascontiguousarray(h_g_all[:, [pos[int(g)] for g in silent]]), device=dev
            )
        pred = model.decode(x[:, -1], y, h_c_sil, h_g)[..., 0]  # [W, H, S] scaled
        mean = np.broadcast_to(self.scaler.mean, (len(self.graph.sensor_ids),))[silent]
        std = np.broadcast_to(self.scaler.std, (len(self.graph.sensor_ids),))[silent]
        return (pred.cpu().numpy() * std + mean).astype(np.float32)

    def forecast(
        self, ends: np.ndarray | list[int], silent: Any = None, noise: float = 0.0
    ) -> ForecastResult:
        """Forecasts of every sensor for the windows ending at ``ends``.

        Windows go ``federation.eval_batch_size`` at a time (one exchange each). A sensor
        counts as answered when its forecasts came back for every window.

        Args:
            ends: ``[W]`` time indices of the windows' last input steps.
            silent: sensors that send nothing this time (robustness): ``[N]`` bool mask,
                node indices, or sensor ids; they are forecast by :meth:`_fallback`.
            noise: Gaussian input noise on every node, std = ``noise`` x the sensor's
                training std (0: none).
        """
        if not self.client_nodes:
            self.setup()
        ends = np.asarray(ends, dtype=np.int64).reshape(-1)
        n = len(self.graph.sensor_ids)
        quiet = self._silent_mask(silent)
        horizon = int(self.cfg.model.horizon)
        out = np.full((len(ends), horizon, n), np.nan, np.float32)
        answered = np.zeros(n, bool)
        for c in self.client_nodes.values():
            answered[c] = True
        answered &= ~quiet
        bs = max(int(self.cfg.federation.eval_batch_size), 1)
        for b in range(0, len(ends), bs):
            got = np.zeros(n, bool)
            self._exchange(ends[b : b + bs], out[b : b + bs], got, quiet, float(noise))
            answered &= got
        if not answered.any():
            raise FederationError("no sensor answered the forecast request")
        out[:, :, ~answered & ~quiet] = np.nan
        return ForecastResult(
            ends,
            out,
            list(self.graph.sensor_ids),
            answered,
            list(self.missing),
            dict(self.seconds),
            {k: dict(v) for k, v in self.bytes.items()},
            quiet if silent is not None else None,
            self.fallback_name() if quiet.any() else "",
        )

    def _silent_mask(self, silent: Any) -> np.ndarray:
        """``[N]`` bool from a mask, node indices or sensor ids (None: nobody silent)."""
        n = len(self.graph.sensor_ids)
        if silent is None:
            return np.zeros(n, bool)
        arr = np.asarray(silent)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise ValueError(f"silent mask of shape {arr.shape}; expected ({n},)")
            return arr.copy()
        mask = np.zeros(n, bool)
        if arr.size and arr.dtype.kind in "US O":
            pos = {s: i for i, s in enumerate(self.graph.sensor_ids)}
            unknown = [str(s) for s in arr if str(s) not in pos]
            if unknown:
                raise ValueError(f"silent sensors {unknown[:5]} are not in the graph")
            arr = np.asarray([pos[str(s)] for s in arr], np.int64)
        mask[arr.astype(np.int64)] = True
        return mask


def choose_silent(n: int, fraction: float, seed: int) -> np.ndarray:
    """``[N]`` bool: ``round(fraction x N)`` sensors chosen by a seeded RNG.

    The choices are nested: for one seed, the sensors silenced at a lower fraction are also
    silenced at every higher one (one random order, cut at the fraction), so curves over
    fractions compare like with like.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"silenced fraction {fraction} outside [0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, bool)
    mask[order[: int(round(fraction * n))]] = True
    return mask
