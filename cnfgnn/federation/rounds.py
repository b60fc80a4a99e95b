"""CNFGNN round orchestration (docs/design.md §5), written once against an engine.

One round: (1) local training + FedAvg, (2) temporal encodings up, (3) split learning of
the server GN, (4) graph embeddings down, (5) validation; early stopping on the node-mean
validation loss; test with the best round's parameters. Every payload is measured (bytes
per phase and direction) and every phase timed; each round is logged and checkpointed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from cnfgnn import progress, rng
from cnfgnn.data.nodes import select_nodes
from cnfgnn.data.scaler import global_scaler
from cnfgnn.evaluation.metrics import SUM_KEYS, metrics_from_sums, node_mean_loss, per_horizon
from cnfgnn.federation import protocol as P
from cnfgnn.federation import secure
from cnfgnn.federation.engines import Engine
from cnfgnn.federation.exchange import exchange
from cnfgnn.federation.node import node_init
from cnfgnn.federation.server import GraphServer, fedavg
from cnfgnn.federation.validate import DEFAULT_REPLY_MAX_ABS, ReplyLimits, check_reply
from cnfgnn.models.node_seq2seq import build_node_model
from cnfgnn.privacy import dp
from cnfgnn.results import NODE_FORECASTS, NODE_STORE, RunWriter, forecasts_released

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The run cannot go on (too few nodes answered, inconsistent clients...)."""


@dataclass
class ServerGraph:
    """All the server knows about the sensor network: the graph, never a series.

    Attributes:
        adjacency: ``[N, N]`` weights of directed edges i -> j (self-loops kept).
        sensor_ids: N sensor ids.
        locations: ``[N, 2]`` (lat, lon) or None.
        interval_minutes: the series' step length, read from the data
            (``SensorData.interval_minutes``); None when the server was not told it.
    """

    adjacency: np.ndarray
    sensor_ids: list[str]
    locations: np.ndarray | None = None
    interval_minutes: float | None = None

    @classmethod
    def from_data(cls, data: Any) -> ServerGraph:
        """The server's view of a loaded :class:`~cnfgnn.data.dataset.SensorData`."""
        return cls(
            np.asarray(data.adjacency),
            list(data.sensor_ids),
            data.locations,
            float(data.interval_minutes),
        )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw initial weights from ``seed`` without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def initial_node_model(cfg: Any) -> dict[str, np.ndarray]:
    """The global node model of round 0, from the experiment seed."""
    m = cfg.model
    with seeded(int(cfg.seed)):
        model = build_node_model(m, 1)
    return {k: v.numpy() for k, v in model.node_state(0).items()}


def report_selection(
    cfg: Any, num_nodes: int, num_test: int, interval_minutes: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Test forecasts kept for plots: ``(node positions [S], window positions [W])``.

    ``predictions.sensors`` positions spread evenly over the ``num_nodes`` evaluated nodes,
    and the test windows of the first ``predictions.hours``. The step length comes from the
    data (``interval_minutes``, any length, e.g. 10 or 0.5 minutes), never from the dataset
    config; when it is unknown (None) every test window is kept.
    """
    pc = cfg.predictions
    k = min(int(pc.sensors), num_nodes)
    if k <= 0 or num_test == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if interval_minutes is None:
        count = num_test
    else:
        if not interval_minutes > 0:
            raise ValueError(f"interval_minutes must be positive, got {interval_minutes}")
        count = max(1, int(math.floor(float(pc.hours) * 60.0 / float(interval_minutes) + 1e-9)))
    return (
        np.unique(np.linspace(0, num_nodes - 1, k).round().astype(np.int64)),
        np.arange(min(num_test, count), dtype=np.int64),
    )


class Orchestrator:
    """The server side of a CNFGNN run.

    Args:
        cfg: composed config.
        engine: transport to the clients.
        graph: the graph the server holds.
        writer: run directory writer (None: nothing written).
        progress: callable for one-line progress messages.
    """

    def __init__(
        self,
        cfg: Any,
        engine: Engine,
        graph: ServerGraph,
        writer: RunWriter | None = None,
        progress: Callable[[str], None] = log.info,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.engine, self.graph, self.writer = cfg, engine, graph, writer
        self.fed = cfg.federation
        self.progress = progress
        self.device = torch.device(device)
        with seeded(int(cfg.seed)):  # GN init from the seed, not the global stream
            self.server = GraphServer(cfg.model, lr=self.fed.server_lr, device=self.device)
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.seconds: dict[str, float] = defaultdict(float)
        self.failures: list[dict[str, Any]] = []
        self.theta = initial_node_model(cfg)
        self.version = 0  # version of theta; clients track which one they hold
        self.client_version: dict[int, int] = {}
        self.step = 0
        self.round = 0
        self.client_nodes: dict[int, np.ndarray] = {}  # filled by the handshake
        self.aggregate = str(self.fed.aggregate)  # fedavg | none | fmtl
        if self.aggregate not in ("fedavg", "none", "fmtl"):
            raise ValueError(
                f"federation.aggregate must be fedavg, none or fmtl, got {self.aggregate!r}"
            )
        self.own_init = node_init(cfg) == "per_node"  # split learning: each node inits its own
        if self.own_init and self.aggregate != "none":
            raise ValueError(
                f"federation.node_init=per_node needs federation.aggregate=none "
                f"(got {self.aggregate}): FedAvg and FMTL start every node from the "
                "global model. Fix: federation.node_init=shared"
            )
        self.node_weights: dict[int, dict[str, np.ndarray]] = {}  # FMTL: each node's last upload
        self.privacy = dp.PrivacySettings.from_cfg(cfg)  # None: no DP (conf/privacy/none.yaml)
        self.releases: dict[str, int] = defaultdict(int)  # per training window, for the accountant
        self.fedavg_rounds: list[tuple[int, int]] = []  # (nodes answered, asked) per FedAvg round
        self.secagg = self.privacy is not None and self.privacy.secagg
        if self.secagg and not getattr(engine, "secure_aggregation", False):  # docs/privacy.md
            raise ValueError(
                "privacy.secagg=true needs an engine that runs the FedAvg phase "
                "through SecAgg+ (engine=simulation or engine=deployment); the "
                "in-process engine has no server/client boundary to protect and "
                "refuses it. Fix: engine=simulation, or privacy.secagg=false"
            )
        self.num_windows: dict[str, int] = {}  # windows per split, from the handshake

    # ------------------------------------------------------------------ transport
    def _send(self, phase: str, mtype: str, payloads: dict[int, P.Payload]) -> dict[int, P.Payload]:
        """Send, measure bytes and time, drop failures, fail when too few answer."""
        limits = self._reply_limits()

        def check(cid: int, request: P.Payload, reply: P.Payload) -> P.Payload:
            nodes = self.client_nodes.get(cid)
            return check_reply(mtype, request, reply, None if nodes is None else len(nodes), limits)

        with progress.send(phase, mtype, payloads, self.num_windows, self.fed.local_epochs):
            ex = exchange(self.engine, mtype, payloads, check)
        self.seconds[phase] += ex.seconds
        if payloads:
            self.bytes[phase]["down_tensor"] += ex.down[0]
            self.bytes[phase]["down_other"] += ex.down[1]
        if ex.replies:
            self.bytes[phase]["up_tensor"] += ex.up[0]
            self.bytes[phase]["up_other"] += ex.up[1]
        for cid, reason in ex.failed.items():
            self._left_out(phase, cid, reason, phase)
        ok = ex.replies
        if self.client_nodes and payloads:
            self._check_quorum(payloads, ok, f"answered {mtype} in phase {phase}")
        elif payloads and not ok:
            raise FederationError(f"no client answered {mtype}")
        return ok

    def _left_out(self, phase: str, cid: int, reason: str, what: str) -> None:
        """Record that client ``cid`` was left out of ``what`` (in ``phase``), and say so."""
        ids = [self.graph.sensor_ids[i] for i in self.client_nodes.get(cid, [])]
        self.failures.append(
            {"round": self.round, "phase": phase, "client": cid, "reason": reason, "sensors": ids}
        )
        shown = ", ".join(ids[:8]) + (f" +{len(ids) - 8}" if len(ids) > 8 else "")
        self.progress(f"  client {cid} (sensors {shown}) left out of {what}: {reason}")

    def _check_quorum(
        self, asked: Iterable[int], answered: Iterable[int], what: str, at_least_one: bool = False
    ) -> None:
        """Fail the run when the nodes of the ``answered`` clients are fewer than
        ``federation.min_answer_fraction`` of those of the ``asked`` clients (or, with
        ``at_least_one``, when none answered)."""
        n_asked = sum(len(self.client_nodes[c]) for c in asked)
        got = sum(len(self.client_nodes[c]) for c in answered)
        if got < self.fed.min_answer_fraction * n_asked or (at_least_one and got == 0):
            raise FederationError(
                f"only {got}/{n_asked} nodes {what}; "
                f"below federation.min_answer_fraction={self.fed.min_answer_fraction}"
            )

    def _reply_limits(self) -> ReplyLimits:
        """Sizes and bounds every reply is checked against (:mod:`validate`)."""
        m = self.cfg.model
        return ReplyLimits(
            num_graph_nodes=len(self.graph.sensor_ids),
            windows=self.num_windows,
            layers=int(m.num_layers),
            hidden=int(m.hidden_size),
            horizon=int(self.cfg.dataset.out_steps),
            weight_shapes={k: tuple(np.shape(v)) for k, v in self.theta.items()},
            max_abs=float(self.fed.get("reply_max_abs", DEFAULT_REPLY_MAX_ABS)),
            weights_up=self.aggregate != "none",
            local_epochs=int(self.fed.local_epochs),
            batch_size=int(self.fed.batch_size),
            sum_keys=tuple(SUM_KEYS),
        )

    def _with_model(self, cid: int, payload: P.Payload) -> P.Payload:
        """Attach the global node model when the client does not hold this version yet."""
        if self.client_version.get(cid) != self.version:
            payload = payload | P.weights_to_payload(self.theta)
        return payload

    def _delivered(self, replies: dict[int, P.Payload], payloads: dict[int, P.Payload]) -> None:
        for cid in replies:
            if any(k.startswith(P.WEIGHTS_PREFIX) for k in payloads[cid]):
                self.client_version[cid] = self.version

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Handshake, training-node selection, scaler, initial model."""
        clients = self.engine.client_ids()
        hello = self._send("setup", P.HELLO, {c: {} for c in clients})
        self.client_nodes = {c: np.asarray(r[P.NODES], np.int64) for c, r in hello.items()}
        n = len(self.graph.sensor_ids)
        hosted = np.concatenate(list(self.client_nodes.values()))
        if len(np.unique(hosted)) != len(hosted) or hosted.min() < 0 or hosted.max() >= n:
            raise FederationError(f"clients host duplicate or unknown nodes (graph has {n})")
        counts = {tuple(np.asarray(r[P.NUM_WINDOWS]).tolist()) for r in hello.values()}
        if len(counts) != 1:
            raise FederationError(f"clients disagree on windows per split: {counts}")
        self.num_windows = dict(zip(P.SPLITS, counts.pop()))
        self.first_start = dict(
            zip(
                P.SPLITS,
                np.asarray(next(iter(hello.values())).get(P.FIRST_START, [-1, -1, -1])).tolist(),
            )
        )
        ratio = self.fed.inductive_ratio
        if ratio is not None and self.per_node_models:
            raise FederationError(
                f"federation.method={self.fed.method} keeps one model per node, so unseen nodes "
                "have no model: it cannot run inductively. Fix: set "
                "federation.inductive_ratio=null "
                "or use a method with a global node model (cnfgnn, fedavg)"
            )
        if ratio is None:
            train = np.sort(hosted)
        else:
            train = select_nodes(n, float(ratio), self.graph.locations, seed=int(self.cfg.seed))
        train_set = set(train.tolist())
        self.train_clients = []
        for c, nodes in sorted(self.client_nodes.items()):
            inside = [int(i) in train_set for i in nodes]
            if all(inside):
                self.train_clients.append(c)
            elif any(inside):
                raise FederationError(
                    f"client {c} mixes training and held-out nodes; "
                    "partition seen and unseen nodes separately"
                )
        self.train_nodes = np.sort(
            np.concatenate([self.client_nodes[c] for c in self.train_clients])
        )
        self.col = {int(g): i for i, g in enumerate(self.train_nodes)}  # global -> train column
        self.eval_nodes = np.sort(hosted)
        self.eval_col = {int(g): i for i, g in enumerate(self.eval_nodes)}
        adj = self.graph.adjacency
        self.train_graph = self.server.graph(adj[np.ix_(self.train_nodes, self.train_nodes)])
        self.eval_graph = self.server.graph(adj[np.ix_(self.eval_nodes, self.eval_nodes)])
        conf: P.Payload = {}
        if self.fed.scaling == "global":
            stats = self._send("setup", P.STATS, {c: {} for c in self.train_clients})
            sc = global_scaler(
                [
                    {"sum": r[P.STAT_SUM], "sumsq": r[P.STAT_SUMSQ], "count": r[P.STAT_COUNT]}
                    for r in stats.values()
                ]
            )
            conf = {
                P.SCALER_MEAN: np.asarray(sc.mean, np.float64),
                P.SCALER_STD: np.asarray(sc.std, np.float64),
            }
            self.scaler = sc
        if self.own_init:  # every node draws its own initial model: theta is not sent
            payloads = {c: conf | {P.NODES: nodes} for c, nodes in self.client_nodes.items()}
            self.client_version.update(
                {c: self.version for c in self._send("setup", P.CONFIGURE, payloads)}
            )
            return
        payloads = {
            c: self._with_model(c, conf | {P.NODES: nodes})  # the node checks NODES
            for c, nodes in self.client_nodes.items()
        }
        self._delivered(self._send("setup", P.CONFIGURE, payloads), payloads)

    # ------------------------------------------------------------------ helpers
    def _assemble(self, replies: dict[int, P.Payload], key: str, col: dict[int, int]) -> np.ndarray:
        """Stack per-client ``[S, K, ...]`` arrays into ``[S, N, ...]`` by node column."""
        first = next(iter(replies.values()))[key]
        out = np.zeros((first.shape[0], len(col)) + first.shape[2:], dtype=first.dtype)
        for c, r in replies.items():
            out[:, [col[int(g)] for g in self.client_nodes[c]]] = r[key]
        return out

    def _slice(self, arr: np.ndarray, cid: int, col: dict[int, int]) -> np.ndarray:
        return np.ascontiguousarray(arr[:, [col[int(g)] for g in self.client_nodes[cid]]])

    @property
    def uses_gn(self) -> bool:
        return bool(self.cfg.model.graph_embedding)

    @property
    def per_node_models(self) -> bool:
        """True when every node keeps its own model (local, FMTL, AT w/o FedAvg, SL)."""
        return self.aggregate != "fedavg"

    def _fmtl_payload(self, cid: int) -> P.Payload:
        """The out-neighbours' weights (round snapshot) and ``A_ij`` for a client's nodes."""
        nodes = self.client_nodes[cid]
        adj = self.graph.adjacency
        sub = adj[np.ix_(nodes, self.train_nodes)].copy()  # [K, N_train]
        sub[np.arange(len(nodes)), [self.col[int(g)] for g in nodes]] = 0.0  # j != i
        cols = np.nonzero((sub > 0).any(0))[0]
        if len(cols) == 0:
            return {}
        nbrs = self.train_nodes[cols]
        out = {
            P.NBR_PREFIX + name: np.stack([self.node_weights[int(j)][name] for j in nbrs])
            for name in self.theta
        }
        out[P.NBR_WEIGHT] = sub[:, cols].astype(np.float64)
        return out

    def _keep(self, action: str) -> None:
        """Per-node methods: the nodes remember (or restore) their best model at home."""
        if self.per_node_models:
            self._send("best", P.KEEP_MODEL, {c: {P.ACTION: action} for c in self.client_nodes})

    # ------------------------------------------------------------------ phases
    def local_phase(self) -> dict[str, float]:
        payloads = {
            c: self._with_model(c, {P.ROUND: self.round, P.STEP: self.step})
            for c in self.train_clients
        }
        dp_fedavg = dp.fedavg_dp(self.privacy, self.aggregate)
        asked = sum(len(self.client_nodes[c]) for c in self.train_clients)
        if dp_fedavg is not None:  # each node's share of the noise is sigma C / sqrt(asked)
            payloads = {c: p | {P.DP_NODES: asked} for c, p in payloads.items()}
        if self.aggregate == "fmtl":
            if not self.node_weights:  # round 1: every node starts from theta
                self.node_weights = {int(g): self.theta for g in self.train_nodes}
            payloads = {c: p | self._fmtl_payload(c) for c, p in payloads.items()}
        if dp_fedavg and self.secagg:  # docs/privacy.md: the server sees only the sum
            return self._secure_local_phase(payloads, asked)
        replies = self._send("local", P.LOCAL_TRAIN, payloads)
        self._delivered(replies, payloads)
        if self.aggregate == "fedavg":
            self.theta = fedavg(
                [P.weights_from_payload(r) for r in replies.values()],
                [r[P.NUM_EXAMPLES] for r in replies.values()],  # DP: uniform
                "uniform" if dp_fedavg is not None else self.fed.fedavg_weighting,
            )
            if dp_fedavg is not None:  # clipped (and with noise_at=node, noised) on the nodes
                self.fedavg_rounds.append((sum(len(self.client_nodes[c]) for c in replies), asked))
            if dp_fedavg is not None and dp_fedavg.fedavg_noise_at == "server":  # central DP
                self.theta = dp.add_fedavg_noise(
                    self.theta,
                    dp_fedavg.fedavg,
                    asked,
                    int(self.cfg.seed) if dp_fedavg.insecure_replayable_noise else None,
                    self.round,
                )
            self.releases["fedavg"] += 1
            self.version += 1
        elif self.aggregate == "fmtl":  # nothing averaged: keep each node's weights
            self.releases["raw"] += 1
            for c, r in replies.items():
                w = P.weights_from_payload(r)
                for k, g in enumerate(self.client_nodes[c]):
                    self.node_weights[int(g)] = {name: v[k] for name, v in w.items()}
        self.step = max(int(r[P.STEP]) for r in replies.values())
        loss = sum(np.sum(r.get(P.LOSS_SUM, np.nan)) for r in replies.values())  # DP: NaN
        count = sum(np.sum(r.get(P.LOSS_COUNT, 0.0)) for r in replies.values())
        return {"train_loss": float(loss / max(count, 1))}

    def _secure_local_phase(self, payloads: dict[int, P.Payload], asked: int) -> dict[str, float]:
        """FedAvg through the engine's secure aggregation (``privacy.secagg``).

        Every request carries the global model (each client's contribution is its nodes'
        update ``w_k - theta``, :mod:`cnfgnn.federation.secure`); the engine returns only
        the mean of the contributions. No loss sums come back: NaN train loss.
        """
        # only called under privacy.fedavg.active and privacy.secagg, which PrivacySettings
        # and __init__ have checked (secagg_plus set, an engine with secure aggregation)
        priv = self.privacy
        assert priv is not None and priv.secagg_plus is not None
        fa, sa, clip = priv.fedavg, priv.secagg_plus, priv.fedavg.clip
        assert clip is not None
        secure_mean = cast(Any, self.engine).secure_mean
        k_max = max(len(self.client_nodes[c]) for c in payloads)
        secure.check_secagg_range(
            float(clip),
            float(fa.noise_multiplier),
            k_max,
            asked,
            len(payloads),
            sa.clipping_range,
            sa.quantization_range,
            sa.modulus_range,
        )
        payloads = {c: p | P.weights_to_payload(self.theta) for c, p in payloads.items()}
        result = secure_mean(P.LOCAL_TRAIN, payloads, sa)
        self.seconds["local"] += result.seconds
        self.bytes["local"]["down_other"] += result.bytes_down  # SecAgg+: serialized bytes
        self.bytes["local"]["up_other"] += result.bytes_up
        for cid, reason in result.failures.items():
            self._left_out("local", cid, reason, "the secure FedAvg sum")
        self._check_quorum(
            payloads, result.clients, "reached the secure FedAvg sum", at_least_one=True
        )
        got = sum(len(self.client_nodes[c]) for c in result.clients)
        for cid in result.clients:  # each now holds its own trained model, not theta
            self.client_version.pop(cid, None)
        self.theta = secure.apply_secure_mean(self.theta, result, got)
        self.fedavg_rounds.append((got, asked))
        self.releases["fedavg"] += 1
        self.version += 1
        self.step = max(self.step, int(result.step))
        return {"train_loss": float("nan")}

    def encode_phase(self, split: str, clients: list[int], phase: str) -> dict[int, P.Payload]:
        payloads = {c: self._with_model(c, {P.SPLIT: split}) for c in clients}
        replies = self._send(phase, P.ENCODE, payloads)
        self._delivered(replies, payloads)
        if split == P.TRAIN:
            self.releases["h_c"] += 1
        return replies

    def split_phase(self, h_c: np.ndarray) -> dict[str, float]:
        """R_s epochs of split learning: GN forward here, decoders and losses on the nodes."""
        s = h_c.shape[0]
        bs = int(self.fed.server_batch_size) * int(self.fed.server_batches_per_trip)
        loss = count = 0.0
        for epoch in range(int(self.fed.server_epochs)):
            self.releases["grad"] += 1  # every training window lies in one batch per epoch
            order = rng.permutations(
                int(self.cfg.seed), np.zeros(1, np.int64), self.round, "server", s, extra=epoch
            )[0]
            for b in range(math.ceil(s / bs)):
                batch = np.sort(order[b * bs : (b + 1) * bs])
                t0 = time.perf_counter()
                h_g = self.server.forward(h_c[batch], self.train_graph)  # [B, N, L, H]
                h_g_np = h_g.detach().cpu().numpy()
                self.seconds["split_server"] += time.perf_counter() - t0
                payloads = {
                    c: {
                        P.BATCH: batch.astype(np.int64),
                        P.ROUND: self.round,
                        P.STEP: self.step,
                        P.H_G: self._slice(h_g_np, c, self.col),
                    }
                    for c in self.train_clients
                }
                replies = self._send("split", P.SPLIT_STEP, payloads)
                t0 = time.perf_counter()
                grad = self._assemble(replies, P.GRAD, self.col)  # missing nodes stay 0
                answered = sum(len(self.client_nodes[c]) for c in replies)
                self.server.step(h_g, grad / answered)  # d(mean over nodes of MSE_k)/dh_G
                self.seconds["split_server"] += time.perf_counter() - t0
                progress.advance(len(batch))
                loss += sum(np.sum(r.get(P.LOSS_SUM, np.nan)) for r in replies.values())
                count += sum(np.sum(r.get(P.LOSS_COUNT, 0.0)) for r in replies.values())
                self.step += 1
        return {"split_loss": float(loss / max(count, 1.0))}

    def sl_epoch(self) -> dict[str, float]:
        """Split learning without alternation: one epoch, node models and GN every step.

        Per batch: nodes send ``h_c`` up, the server runs the GN and sends ``h_G`` down, the
        nodes return ``dL/dh_G``, the server steps the GN and returns ``dL/dh_c``, the nodes
        step their own models. Three round trips per batch; nothing is averaged.
        """
        s = self.num_windows[P.TRAIN]
        bs = int(self.fed.batch_size)
        order = rng.permutations(int(self.cfg.seed), np.zeros(1, np.int64), self.round, "sl", s)[0]
        loss = count = 0.0
        self.releases["h_c"] += 1  # every training window: h_c and dL/dh_G once per epoch
        self.releases["grad"] += 1
        for b in range(math.ceil(s / bs)):
            batch = np.sort(order[b * bs : (b + 1) * bs]).astype(np.int64)
            req: P.Payload = {P.BATCH: batch}
            if self.privacy is not None:  # keys the nodes' noise for this release
                req = req | {P.ROUND: self.round, P.STEP: self.step}
            enc = self._send("split", P.SL_ENCODE, {c: dict(req) for c in self.train_clients})
            t0 = time.perf_counter()
            h_c = torch.tensor(
                self._assemble(enc, P.H_C, self.col), device=self.device, requires_grad=True
            )  # [B, N, L, H]
            h_g = self.server.forward(h_c, self.train_graph)
            h_g_np = h_g.detach().cpu().numpy()
            self.seconds["split_server"] += time.perf_counter() - t0
            dec = self._send(
                "split",
                P.SL_DECODE,
                {
                    c: {
                        P.BATCH: batch,
                        P.ROUND: self.round,
                        P.STEP: self.step,
                        P.H_G: self._slice(h_g_np, c, self.col),
                    }
                    for c in enc
                },
            )
            t0 = time.perf_counter()
            answered = sum(len(self.client_nodes[c]) for c in dec)
            g_hc = self.server.step_through(
                h_c, h_g, self._assemble(dec, P.GRAD, self.col), answered
            )
            self.seconds["split_server"] += time.perf_counter() - t0
            self._send(
                "split",
                P.SL_BACKWARD,
                {c: {P.GRAD_H_C: self._slice(g_hc, c, self.col)} for c in dec},
            )
            loss += sum(np.sum(r.get(P.LOSS_SUM, np.nan)) for r in dec.values())
            count += sum(np.sum(r.get(P.LOSS_COUNT, 0.0)) for r in dec.values())
            self.step += 1
            progress.advance(len(batch))
        return {"train_loss": float(loss / max(count, 1.0))}

    def embed_phase(self, h_c: np.ndarray, phase: str = "embed") -> None:
        t0 = time.perf_counter()
        h_g = self.server.embed_all(h_c, self.train_graph, int(self.fed.server_eval_batch_size))
        self.seconds[phase + "_server"] += time.perf_counter() - t0
        payloads = {c: {P.H_G: self._slice(h_g, c, self.col)} for c in self.train_clients}
        self._send(phase, P.EMBED, payloads)

    def evaluate(
        self, split: str, phase: str, report: dict[int, P.Payload] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[int, P.Payload]]:
        """Encode up, ``h_G`` down, error sums up: ``(sums [N, H] per key, replies)``.

        ``report`` (client -> ``REPORT``/``REPORT_NODES``/``RELEASE`` entries, from
        :meth:`_report_request`) asks those clients to keep forecasts too.
        """
        clients = sorted(self.client_nodes)
        payloads: dict[int, P.Payload] = {c: {P.SPLIT: split} for c in clients}
        if self.uses_gn:
            enc = self.encode_phase(split, clients, phase)
            h_c = self._assemble(enc, P.H_C, self.eval_col)
            t0 = time.perf_counter()
            h_g = self.server.embed_all(h_c, self.eval_graph, int(self.fed.server_eval_batch_size))
            self.seconds[phase + "_server"] += time.perf_counter() - t0
            payloads = {c: {P.SPLIT: split, P.H_G: self._slice(h_g, c, self.eval_col)} for c in enc}
        else:
            payloads = {c: self._with_model(c, p) for c, p in payloads.items()}
        for c, ask in (report or {}).items():
            if c in payloads:
                payloads[c].update(ask)
        replies = self._send(phase, P.EVALUATE, payloads)
        self._delivered(replies, payloads)
        n = len(self.eval_nodes)
        sums: dict[str, np.ndarray] = {}
        for c, r in replies.items():
            cols = [self.eval_col[int(g)] for g in self.client_nodes[c]]
            for k, v in r.items():
                if k.startswith(P.ERR_PREFIX):
                    name = k[len(P.ERR_PREFIX) :]
                    sums.setdefault(name, np.zeros((n,) + v.shape[1:]))[cols] = v
        return sums, replies

    # ------------------------------------------------------------------ main loop
    def _checkpoint(self, es: dict[str, Any]) -> None:
        if self.writer is None:
            return
        from cnfgnn.data.graph import graph_fingerprint

        sc = getattr(self, "scaler", None)  # global scaling only (per-node stays on the nodes)
        self.writer.save_checkpoint(
            {
                "round": self.round,
                "theta": self.theta,
                "version": self.version,
                "step": self.step,
                "server": self.server.state_dict(),
                "early_stopping": es,
                "bytes": {k: dict(v) for k, v in self.bytes.items()},
                "seconds": dict(self.seconds),
                "failures": self.failures,
                "seconds_total": self._elapsed(),  # wall time of every process so far
                # for cnfgnn-forecast: the scaler and the network the model was trained on
                "scaler": None
                if sc is None
                else {"mean": np.asarray(sc.mean), "std": np.asarray(sc.std)},
                "graph": graph_fingerprint(self.graph.adjacency, self.graph.sensor_ids),
                "privacy_releases": dict(self.releases),
                "privacy_fedavg_rounds": self.fedavg_rounds,
            }
        )

    def _elapsed(self) -> float:
        """Seconds of this run: earlier processes' (from the checkpoint) plus this one's."""
        return self.seconds_before + time.perf_counter() - self.t_start

    def run(self) -> dict[str, Any]:
        """Train with early stopping, test the best round; returns ``final.json``'s content.

        The best round's parameters are kept by value (``copy.deepcopy`` of theta, and
        :meth:`GraphServer.state_dict` copies), so test pairs that round's node model with
        that round's GN, never with a later round's.
        """
        self.t_start, self.seconds_before = time.perf_counter(), 0.0
        if self.privacy is not None and self.privacy.insecure_replayable_noise:
            self.progress(
                "privacy: INSECURE: privacy.insecure_replayable_noise=true, the noise "
                "is keyed by the run config and anyone holding it can remove it"
            )
        self.round = 0
        self.setup()
        es: dict[str, Any] = {
            "best_loss": math.inf,
            "best_round": 0,
            "bad_rounds": 0,
            "best_theta": copy.deepcopy(self.theta),
            "best_server": self.server.state_dict(),
        }
        start_round = 1
        ckpt = self.writer.load_checkpoint() if (self.writer and self.cfg.resume) else None
        if ckpt is not None:
            if self.per_node_models:
                raise FederationError(
                    f"resume is not supported for federation.method={self.fed.method}: its node "
                    "models live on the nodes, not in the server checkpoint. Fix: start a new run"
                )
            start_round = self._restore(ckpt)
            es = ckpt["early_stopping"]
        self.round = start_round - 1  # after the loop: the last round actually run
        for r in range(start_round, int(self.fed.rounds) + 1):
            if es["bad_rounds"] >= int(self.fed.early_stopping_patience):
                break
            self.round = r
            before = dict(self.seconds)
            rec = self.train_round()
            sums, _ = self.evaluate(P.VAL, "val")
            rec["seconds"] = {k: v - before.get(k, 0.0) for k, v in self.seconds.items()}
            val = metrics_from_sums(sums)
            rec.update(
                {
                    "val_loss": node_mean_loss(sums),
                    "val_rmse": val["rmse"],
                    "val_mae": val["mae"],
                    "val_masked_mae": val["masked_mae"],
                }
            )
            if rec["val_loss"] < es["best_loss"]:
                es.update(
                    best_loss=rec["val_loss"],
                    best_round=self.round,
                    bad_rounds=0,
                    best_theta=copy.deepcopy(self.theta),
                    best_server=self.server.state_dict(),
                )
                self._keep(P.KEEP_BEST)
            else:
                es["bad_rounds"] += 1
            rec.update(self._totals())
            if self.writer:
                self.writer.log_round(rec)
            self._checkpoint(es)
            if self.round % int(self.cfg.log_every) == 0:
                self.progress(
                    f"round {self.round:3d}  train {rec.get('train_loss', math.nan):.4f}"
                    f"  val loss {rec['val_loss']:.4f}  val RMSE {rec['val_rmse']:.3f}"
                    f"  ({rec['seconds_round']:.1f}s)"
                )
        return self.test(es, self._elapsed())

    def train_round(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"round": self.round}
        if not bool(self.fed.alternating):
            if not self.uses_gn:
                raise FederationError("split learning needs the graph network: use model=cnfgnn")
            with progress.phase("split", self.num_windows[P.TRAIN]):
                rec.update(self.sl_epoch())
            rec["step"] = self.step
            rec["seconds_round"] = time.perf_counter() - t0
            return rec
        rec.update(self.local_phase())
        if self.uses_gn:
            enc = self.encode_phase(P.TRAIN, self.train_clients, "encode")
            h_c = self._assemble(enc, P.H_C, self.col)  # [S, N_train, L, H]
            with progress.phase("split", len(h_c) * int(self.fed.server_epochs)):
                rec.update(self.split_phase(h_c))
            self.embed_phase(h_c)
        rec["step"] = self.step
        rec["seconds_round"] = time.perf_counter() - t0
        return rec

    def _totals(self) -> dict[str, Any]:
        return {
            "bytes": {k: dict(v) for k, v in self.bytes.items()},
            "failures": len(self.failures),
        }

    def _restore(self, ckpt: dict[str, Any]) -> int:
        """Continue after ``ckpt['round']``: reload server state, rebuild the nodes' h_G.

        The totals go on from the checkpoint's (bytes, seconds and failures per phase, wall
        time): ``final.json`` then counts the whole run, not only the rounds after the
        restart. What the restart itself costs (this process's handshake and the re-encoding
        that rebuilds the nodes' ``h_G``) is counted under the phase ``resume``. The part of
        the interrupted round that ran before the stop is not in the checkpoint and is lost.
        """
        restart_bytes, restart_seconds, restart_failures = self.bytes, self.seconds, self.failures
        self.bytes = defaultdict(lambda: defaultdict(int))
        for phase, counts in ckpt.get("bytes", {}).items():
            self.bytes[phase].update(counts)
        for counts in restart_bytes.values():  # the handshake again: a cost of the restart
            for k, v in counts.items():
                self.bytes["resume"][k] += v
        self.seconds = defaultdict(float, ckpt.get("seconds", {}))
        self.seconds["resume"] += sum(restart_seconds.values())
        self.failures = list(ckpt.get("failures", [])) + [
            f | {"phase": "resume"} for f in restart_failures
        ]
        self.seconds_before = float(ckpt.get("seconds_total", 0.0))
        self.theta, self.version = ckpt["theta"], ckpt["version"] + 1
        self.step = ckpt["step"]
        self.releases.update(ckpt.get("privacy_releases", {}))
        self.fedavg_rounds = [tuple(r) for r in ckpt.get("privacy_fedavg_rounds", [])]
        self.server.load_state_dict(ckpt["server"])
        self.round = ckpt["round"]
        if self.uses_gn and self.round > 0:  # the nodes' cached h_G = GN(h_c(theta))
            enc = self.encode_phase(P.TRAIN, self.train_clients, "resume")
            self.embed_phase(self._assemble(enc, P.H_C, self.col), "resume")
        if self.writer:
            self.writer.truncate_rounds(self.round)
        self.progress(f"resumed after round {self.round}")
        return self.round + 1

    def _report_request(self) -> dict[int, P.Payload]:
        """What each client is asked to keep of its test forecasts (for plots):
        ``predictions.sensors`` sensors spread over the network, the first
        ``predictions.hours`` of the test split. The nodes write them to their own disks;
        they come to the server only with ``predictions.release=true`` (``RELEASE``)."""
        pos, windows = report_selection(
            self.cfg, len(self.eval_nodes), self.num_windows[P.TEST], self.graph.interval_minutes
        )
        chosen = set(self.eval_nodes[pos].tolist())
        self.report_nodes = sorted(chosen)
        if not len(windows):
            return {}
        release: P.Payload = {P.RELEASE: True} if forecasts_released(self.cfg) else {}
        out: dict[int, P.Payload] = {}
        for c, nodes in sorted(self.client_nodes.items()):
            mine = [int(g) for g in nodes.tolist() if int(g) in chosen]
            if mine:
                out[c] = {P.REPORT: windows, P.REPORT_NODES: np.asarray(mine, np.int64)} | release
        return out

    def _predictions(
        self, report: dict[int, P.Payload], replies: dict[int, P.Payload]
    ) -> dict[str, Any] | None:
        """Which sensors' test forecasts were kept, and where (``final.json``'s
        ``predictions``). By default they stay on the nodes (``node_store/forecasts/`` of
        each node's disk); with ``predictions.release=true`` they came up and are written
        to ``predictions.npz``, and ``released_to_server`` marks the release."""
        if not report:
            return None
        answered = [c for c in sorted(report) if c in replies]
        ids = [self.graph.sensor_ids[int(g)] for c in answered for g in report[c][P.REPORT_NODES]]
        windows = next(iter(report.values()))[P.REPORT]
        released = any(P.RELEASE in r for r in report.values())
        out: dict[str, Any] = {
            "sensors": ids,
            "windows": len(windows),
            "released_to_server": released,
        }
        if not released:
            out["kept_on_nodes"] = f"{NODE_STORE}/{NODE_FORECASTS}/<sensor>.npz on each node's disk"
            return out
        cols = [
            replies[c][P.FORECAST][:, :, j]
            for c in answered
            for j in range(len(report[c][P.REPORT_NODES]))
        ]
        if not cols:
            return out
        first = int(self.first_start[P.TEST])
        t_index = first + windows + int(self.cfg.dataset.in_steps) if first >= 0 else windows
        if self.writer:
            self.writer.write_predictions(
                np.asarray(ids), t_index.astype(np.int64), np.stack(cols, axis=-1)
            )
        self.progress(
            f"predictions.release=true: test forecasts of {len(ids)} sensors were "
            "sent to the server (predictions.npz; marked in final.json)"
        )
        out["file"] = "predictions.npz"
        return out

    def test(self, es: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Evaluate the best round's parameters on the test split."""
        if self.per_node_models:
            self._keep(P.RESTORE_BEST)
        else:
            self.theta = es["best_theta"]
            self.version += 1
        self.server.load_state_dict(es["best_server"])
        report = self._report_request()
        sums, replies = self.evaluate(P.TEST, "test", report)
        final: dict[str, Any] = {
            "test": metrics_from_sums(sums),
            "best_round": es["best_round"],
            "rounds_run": self.round,
            "best_val_loss": es["best_loss"],
            "test_per_horizon": per_horizon(sums),
        }
        per_node = np.sqrt(sums["sq"].sum(1) / np.maximum(sums["count"].sum(1), 1))
        per_node[sums["count"].sum(1) == 0] = np.nan  # did not answer (null in final.json)
        final["test_rmse_per_node"] = dict(
            zip([self.graph.sensor_ids[i] for i in self.eval_nodes], per_node.tolist())
        )
        if self.fed.inductive_ratio is not None:
            seen = np.isin(self.eval_nodes, self.train_nodes)
            final["test_seen"] = metrics_from_sums({k: v[seen] for k, v in sums.items()})
            final["test_unseen"] = metrics_from_sums({k: v[~seen] for k, v in sums.items()})
        final["predictions"] = self._predictions(report, replies)
        final["parameters"] = {
            "node": int(sum(np.asarray(v).size for v in self.theta.values())),
            "server": self.server.num_parameters() if self.uses_gn else 0,
        }
        final.update(self._totals())
        final["bytes_total"] = int(sum(sum(v.values()) for v in self.bytes.values()))
        final["seconds_total"] = seconds
        final["seconds"] = dict(self.seconds)
        final["failures"] = self.failures
        final["nodes"] = {
            "total": len(self.eval_nodes),
            "train": len(self.train_nodes),
            "clients": len(self.client_nodes),
        }
        if self.privacy is not None:
            from cnfgnn.privacy.accounting import describe, privacy_report

            final["privacy"] = privacy_report(
                self.privacy,
                dict(self.releases),
                fedavg_rounds=self.fedavg_rounds,
                per_node_models=self.per_node_models,
                global_scaling=str(self.fed.scaling) == "global",
                forecasts_released=forecasts_released(self.cfg),
            )
            self.progress(describe(final["privacy"]))
        if self.writer:
            self.writer.write_final(final)
        return final
