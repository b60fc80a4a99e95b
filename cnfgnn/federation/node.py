"""Node-side work of CNFGNN: everything a client does with its own sensors' series.

Plain PyTorch, no Flower import. A client hosts a group of K sensors; each keeps its own
weights and optimizer state (stacked along K, computed in batched passes). The worker
answers one message type per method and keeps what must survive between messages:

* the last global node model it received, the scaler;
* ``h_c`` of the last encoded split (the decoder's initial state in split learning);
* ``h_G`` for every training window (fixed input of the next round's local training).

Nothing a worker returns holds inputs or targets: weights, ``h_c``, ``dL/dh_G``, sums.
Test forecasts for plots stay on the node's own disk unless ``predictions.release=true``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from cnfgnn import progress, rng
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.scaler import Scaler, input_stats, per_node_scaler
from cnfgnn.data.windows import split_starts
from cnfgnn.evaluation.metrics import error_sums
from cnfgnn.federation import protocol as P
from cnfgnn.federation.validate import NodeLimits, check_request
from cnfgnn.models.node_seq2seq import NodeSeq2Seq, build_node_model, teacher_forcing_prob
from cnfgnn.optim import make_adam
from cnfgnn.privacy import dp
from cnfgnn.results import forecasts_released, safe_name, write_node_forecast

NODE_INIT = ("shared", "per_node")  # federation.node_init


def node_init(cfg: Any) -> str:
    """``federation.node_init``: ``shared`` (every node starts from the server's global
    model) or ``per_node`` (each node draws its own, :func:`own_initial_state`)."""
    value = str(cfg.federation.get("node_init", "shared"))
    if value not in NODE_INIT:
        raise ValueError(f"federation.node_init must be one of {NODE_INIT}, got {value!r}")
    return value


def own_initial_state(cfg: Any, nodes: np.ndarray) -> dict[str, Tensor]:
    """Independent initial weights for each node: name -> ``[K, ...]``.

    Node ``g``'s weights are PyTorch's default initialisation of a one-node model drawn
    from a seed that depends only on (``cfg.seed``, g) (:mod:`cnfgnn.rng`, phase
    ``init``), never on the other nodes, the grouping or the global random stream.
    """
    m = cfg.model
    u = rng.uniforms(int(cfg.seed), np.asarray(nodes, np.int64), 0, "init", 1)[:, 0]  # [K]
    states = []
    for seed in (u * float(1 << 53)).astype(np.int64):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            one = build_node_model(m, 1)
        states.append(one.node_state(0))
    return {n: torch.stack([st[n] for st in states]) for n in states[0]}


@dataclass
class LocalSeries:
    """The series a client holds: only its own K sensors.

    Attributes:
        nodes: ``[K]`` global node indices.
        sensor_ids: K sensor ids.
        speed: ``[T, K]`` float32 original units (missing = 0).
        mask: ``[T, K]`` bool, True where observed.
        time_of_day: ``[T]`` float32 fraction of the day.
        starts: window start indices per split (``train``/``val``/``test``).
    """

    nodes: np.ndarray
    sensor_ids: list[str]
    speed: np.ndarray
    mask: np.ndarray
    time_of_day: np.ndarray
    starts: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_arrays(
        cls,
        nodes: np.ndarray,
        sensor_ids: list[str],
        speed: np.ndarray,
        mask: np.ndarray,
        time_of_day: np.ndarray,
        dataset_cfg: Any,
    ) -> LocalSeries:
        """Build from a client's columns and the dataset's window/split settings."""
        split = dataset_cfg.split
        starts = split_starts(
            speed.shape[0],
            dataset_cfg.in_steps,
            dataset_cfg.out_steps,
            split.train,
            split.val,
            split.test,
        )
        return cls(
            np.asarray(nodes, dtype=np.int64),
            list(sensor_ids),
            speed.astype(np.float32),
            mask.astype(bool),
            time_of_day.astype(np.float32),
            starts,
        )

    @classmethod
    def from_data(
        cls,
        data: SensorData,
        nodes: np.ndarray,
        dataset_cfg: Any,
        time_of_day: np.ndarray | None = None,
    ) -> LocalSeries:
        """The columns ``nodes`` of a loaded dataset (``time_of_day``: its ``[T]`` clock,
        when the caller already has it)."""
        nodes = np.asarray(nodes)
        return cls.from_arrays(
            nodes,
            [data.sensor_ids[i] for i in nodes],
            data.speed[:, nodes],
            data.mask[:, nodes],
            data.time_of_day() if time_of_day is None else time_of_day,
            dataset_cfg,
        )


def masked_mse(pred: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-node mean squared error of ``pred`` ``[B, H, K, 1]`` against ``y`` ``[B, H, K]``
    over the entries ``mask`` ``[B, H, K]`` marks (None: all): losses ``[K]``, their sums
    (detached) and counts."""
    err = (pred[..., 0] - y).square()  # [B, H, K]
    if mask is None:
        sums = err.sum((0, 1))
        counts = torch.full_like(sums, float(err.shape[0] * err.shape[1]))
    else:
        sums, counts = (err * mask).sum((0, 1)), mask.sum((0, 1))
    return sums / counts.clamp_min(1.0), sums.detach(), counts


@dataclass
class SplitBatch:
    """One server batch as a client decodes it in the split step. Every tensor has the
    client's nodes on its K axis, so the batches of several clients stack into one
    (:mod:`cnfgnn.federation.fused`)."""

    x_last: Tensor  # [B, K, F] last observed input
    y_tod: Tensor  # [B, H, K] time of day of the targets
    y: Tensor  # [B, H, K] scaled targets
    mask: Tensor | None  # [B, H, K] observed targets (float); None: unmasked loss
    h_c: Tensor  # [B, K, L, H] the node's own encoding
    h_g: Tensor  # [B, K, L, H] the server's graph embedding
    teacher: Tensor  # [H, K] scheduled-sampling coins

    #: The K axis of each field.
    NODE_AXIS = {"x_last": 1, "y_tod": 2, "y": 2, "mask": 2, "h_c": 1, "h_g": 1, "teacher": 1}

    @classmethod
    def stack(cls, parts: list[SplitBatch]) -> SplitBatch:
        """The batches of several clients (same windows) as one, nodes in ``parts`` order."""
        fields: dict[str, Any] = {}
        for name, axis in cls.NODE_AXIS.items():
            values = [getattr(p, name) for p in parts]
            fields[name] = None if values[0] is None else torch.cat(values, dim=axis)
        return cls(**fields)


def decode_group(
    rows: slice, net: NodeSeq2Seq, sb: SplitBatch, h_g: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The split step's decoding of one node group: ``net`` (the views of rows ``rows``)
    decodes ``sb``'s windows of those rows from their ``h_c`` and ``h_g`` ``[B, k, L, H]``
    (a leaf for ``dL/dh_G``, or the GN's output with its graph). Returns
    :func:`masked_mse`'s per-node losses ``[k]`` (with the graph back to ``h_g``), sums and
    counts."""
    pred = net.decode(
        sb.x_last[:, rows],
        sb.y_tod[..., rows],
        sb.h_c[:, rows],
        h_g,
        targets=sb.y[..., rows],
        teacher=sb.teacher[:, rows],
    )
    mask = None if sb.mask is None else sb.mask[..., rows]
    return masked_mse(pred, sb.y[..., rows], mask)


def split_decode(
    groups: list[tuple[slice, NodeSeq2Seq]], sb: SplitBatch
) -> tuple[Tensor, Tensor, Tensor]:
    """The split step's node side: decode ``sb`` with the node model (its runs ``groups``,
    frozen) and return d(loss_k)/d(h_G,k) ``[B, K, L, H]``, loss sums and counts ``[K]``."""
    grad = torch.empty_like(sb.h_g)
    sums, counts = torch.empty(2, sb.h_g.shape[1], device=sb.h_g.device)
    for rows, net in groups:  # no weight gradients here
        h_g = sb.h_g[:, rows].detach().requires_grad_(True)
        per_node, sums[rows], counts[rows] = decode_group(rows, net, sb, h_g)
        (grad[:, rows],) = torch.autograd.grad(per_node.sum(), h_g)
    return grad, sums, counts


def group_gradients(
    groups: list[tuple[slice, NodeSeq2Seq]],
    buffers: list[Tensor],
    losses: Callable[[slice, NodeSeq2Seq], Tensor],
) -> None:
    """Weight gradients of a node model, run by run (:meth:`NodeSeq2Seq.node_groups`).

    ``losses(rows, view)`` returns the per-node losses ``[k]`` of the nodes ``rows``; the
    gradients of their sum go to rows ``rows`` of ``buffers`` (one ``[K, ...]`` tensor per
    parameter, in ``parameters()`` order). Node k's gradient depends on its own loss only,
    so the runs together write every row once, as one backward pass over all nodes would.
    """
    for rows, view in groups:
        grads = torch.autograd.grad(losses(rows, view).sum(), list(view.parameters()))
        for g_all, g in zip(buffers, grads, strict=True):
            g_all[rows] = g


class NodeWorker:
    """A client's node group: the handlers of every CNFGNN message type.

    Args:
        series: the client's own series.
        cfg: the composed experiment config (``model``, ``federation``, ``dataset``, ``seed``).
        device: torch device for the node models.
        store: the node's own disk. Per-node methods: ``keep_best`` also writes each
            sensor's best model there, and ``CONFIGURE`` with ``OWN_MODEL`` reads it back.
            Every method: the test forecasts the server names with ``REPORT`` are kept
            there (``forecasts/<sensor>.npz``). Nothing in it goes to the server.
    """

    def __init__(
        self,
        series: LocalSeries,
        cfg: Any,
        device: torch.device | str = "cpu",
        build_model: bool = True,
        store: str | Path | None = None,
    ):
        self.series = series
        self.cfg = cfg
        self.device = torch.device(device)
        self.in_steps = int(cfg.dataset.in_steps)
        self.out_steps = int(cfg.dataset.out_steps)
        m = cfg.model
        self.model = (
            build_node_model(m, len(series.nodes)).to(self.device) if build_model else None
        )  # False: data handling only
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Scaler | None = None
        self.inputs: Tensor | None = None  # [K, T, F] scaled speed + time of day
        self.h_c: dict[str, Tensor] = {}  # split -> [S, K, L, H]
        self.h_g_train: Tensor | None = None  # [S_train, K, L, H]
        self.round = 0
        self.best_model: dict[str, Tensor] | None = None  # methods without a global model
        self.sl_pending: dict[str, Any] | None = None  # split learning: batch between messages
        self.privacy = dp.PrivacySettings.from_cfg(cfg)  # None: uploads sent as computed
        self.store = None if store is None else Path(store)
        self._noisy: tuple[float, Tensor] | None = None  # (level, noisy inputs), inference only
        self._views: dict[tuple[int | None, bool], list[tuple[slice, NodeSeq2Seq]]] = {}

    # ------------------------------------------------------------------ dispatch
    def handle(self, message_type: str, payload: P.Payload) -> P.Payload:
        """Answer one message (the only entry point the engines call): check it against
        its row of ``protocol.MESSAGES``, then call the method that row names."""
        # types, shapes, finite values, ranges, hosted sensors, order (raises MalformedMessage)
        payload = check_request(message_type, payload, self.limits())
        row = P.message(message_type)
        assert row is not None  # check_request refuses a type without a row
        handler: Callable[[P.Payload], P.Payload] = getattr(self, row.method)
        return handler(payload)

    def limits(self) -> NodeLimits:
        """What a request is checked against: sizes, window counts, current state."""
        m = self.cfg.model
        shapes = (
            None
            if self.model is None
            else {n: tuple(p.shape[1:]) for n, p in self.model.named_parameters()}
        )
        return NodeLimits(
            nodes=self.series.nodes,
            windows={s: len(self.series.starts[s]) for s in P.SPLITS},
            num_steps=int(self.series.speed.shape[0]),
            in_steps=self.in_steps,
            layers=int(m.num_layers),
            hidden=int(m.hidden_size),
            graph_embedding=bool(m.graph_embedding),
            weight_shapes=shapes,
            configured=self.inputs is not None and self.scaler is not None,
            encoded={s: len(v) for s, v in self.h_c.items()},
            pending_batch=None if self.sl_pending is None else len(self.sl_pending[P.BATCH]),
        )

    @property
    def num_nodes(self) -> int:
        return len(self.series.nodes)

    @property
    def net(self) -> NodeSeq2Seq:
        """The stacked node models; raises on a worker built with ``build_model=False``."""
        if self.model is None:
            raise RuntimeError(
                "this NodeWorker was built with build_model=False (data handling only) "
                "and has no node model; build it with build_model=True to train or predict"
            )
        return self.model

    @property
    def fitted_scaler(self) -> Scaler:
        """The scaler set by ``CONFIGURE``; raises before it."""
        if self.scaler is None:
            raise RuntimeError(f"no scaler yet: send {P.CONFIGURE} first")
        return self.scaler

    @property
    def scaled_inputs(self) -> Tensor:
        """The scaled inputs ``[K, T, F]`` set by ``CONFIGURE``; raises before it."""
        if self.inputs is None:
            raise RuntimeError(f"no inputs yet: send {P.CONFIGURE} first")
        return self.inputs

    def hello(self, payload: P.Payload) -> P.Payload:
        counts = [len(self.series.starts[s]) for s in P.SPLITS]
        first = [
            int(self.series.starts[s][0]) if len(self.series.starts[s]) else -1 for s in P.SPLITS
        ]
        return {
            P.NODES: self.series.nodes.copy(),
            P.SENSOR_IDS: ",".join(self.series.sensor_ids),
            P.NUM_WINDOWS: np.asarray(counts, dtype=np.int64),
            P.FIRST_START: np.asarray(first, dtype=np.int64),
        }

    def stats(self, payload: P.Payload) -> P.Payload:
        """Per-node sums of the training inputs (each step once per window covering it)."""
        st = self._input_stats()
        return {
            P.STAT_SUM: np.asarray(st["sum"], np.float64),
            P.STAT_SUMSQ: np.asarray(st["sumsq"], np.float64),
            P.STAT_COUNT: np.asarray(st["count"], np.float64),
        }

    def _input_stats(self) -> dict[str, np.ndarray]:
        return input_stats(
            self.series.speed,
            self.series.starts[P.TRAIN],
            self.in_steps,
            include_missing=self.cfg.federation.scaler_include_missing,
            mask=self.series.mask,
        )

    def configure(self, payload: P.Payload) -> P.Payload:
        """Set the scaler and the initial global node model; scale the local inputs."""
        if P.SCALER_MEAN in payload:
            self.scaler = Scaler(
                np.asarray(payload[P.SCALER_MEAN], np.float64),
                np.asarray(payload[P.SCALER_STD], np.float64),
            )
        else:  # per-node scaling: computed here, nothing leaves the node
            self.scaler = per_node_scaler(self._input_stats())
        scaled = self.scaler.transform(self.series.speed).astype(np.float32)  # [T, K]
        tod = np.broadcast_to(self.series.time_of_day[:, None], scaled.shape)
        feats = np.stack([scaled, tod], axis=-1)  # [T, K, 2]
        self.inputs = torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2))).to(
            self.device
        )
        self.raw = torch.from_numpy(np.ascontiguousarray(self.series.speed.T)).to(self.device)
        self.observed = torch.from_numpy(np.ascontiguousarray(self.series.mask.T)).to(self.device)
        self._noisy = None
        if self.model is None:
            return {}
        if payload.get(P.OWN_MODEL):
            self._load_own()
        elif node_init(self.cfg) == "per_node":  # split learning: each node its own init
            self.net.load_stacked_state(own_initial_state(self.cfg, self.series.nodes))
        self._load_global(payload)
        s_train = len(self.series.starts[P.TRAIN])
        m = self.cfg.model
        self.h_g_train = torch.zeros(
            s_train, self.num_nodes, m.num_layers, m.hidden_size, device=self.device
        )  # round 1: h_G = 0
        return {}

    def _load_global(self, payload: P.Payload) -> None:
        weights = P.weights_from_payload(payload)
        if weights:
            self.net.load_global_state(
                {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
            )

    # ------------------------------------------------------------------ batches
    def _gather(self, split: str, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Windows for each node: ``idx`` is ``[K, B]`` positions within ``split``.

        Returns x ``[B, T_in, K, F]``, x_last ``[B, K, F]``, y_tod ``[B, H, K]``,
        y_scaled ``[B, H, K]`` and the flat time index ``[K, B, T_in + H]``.
        """
        assert self.inputs is not None, "configure must come first"
        starts = torch.as_tensor(self.series.starts[split], device=self.device)
        span = torch.arange(self.in_steps + self.out_steps, device=self.device)
        t = starts[idx][..., None] + span  # [K, B, T_in + H]
        k = torch.arange(self.num_nodes, device=self.device)[:, None, None]
        win = self.inputs[k, t]  # [K, B, T_in + H, F]
        x = win[:, :, : self.in_steps].permute(1, 2, 0, 3)  # [B, T_in, K, F]
        y = win[:, :, self.in_steps :].permute(1, 2, 0, 3)  # [B, H, K, F]
        return x, x[:, -1], y[..., 1], y[..., 0], t

    def _teacher(self, phase: str, step: int, batch: int) -> Tensor:
        """Scheduled-sampling coins ``[H, K]``: one draw per decoding step per node."""
        p = teacher_forcing_prob(step, float(self.cfg.model.cl_decay_steps))
        u = rng.uniforms(
            self.cfg.seed,
            self.series.nodes,
            self.round,
            phase,
            self.out_steps,
            extra=step * 1_000_003 + batch,
        )
        return torch.from_numpy(u.T <= p).to(self.device)

    def _groups(self, trainable: bool) -> list[tuple[slice, NodeSeq2Seq]]:
        """The node model in runs of ``node_chunk`` nodes (:meth:`NodeSeq2Seq.node_groups`),
        built once per worker (views of the weights, which are only ever updated in place)
        and set to the model's train / eval mode."""
        size = OmegaConf.select(self.cfg, "node_chunk", default=None)
        key = (None if size is None else int(size), trainable)
        if key not in self._views:
            self._views[key] = self.net.node_groups(*key)
        groups = self._views[key]
        for _, view in groups:
            view.train(self.net.training)
        return groups

    def group_losses(
        self,
        x: Tensor,
        y_tod: Tensor,
        h_g: Tensor | None,
        y: Tensor,
        t: Tensor,
        teacher: Tensor,
        loss_sum: Tensor,
        count: Tensor,
    ) -> Callable[[slice, NodeSeq2Seq], Tensor]:
        """The training losses of one batch (:meth:`_gather`'s tensors, ``h_g``
        ``[B, K, L, H]`` or None, coins ``[H, K]``) as :func:`group_gradients` takes them:
        ``(rows, view)`` -> per-node losses ``[k]``; adds their sums and counts to rows
        ``rows`` of ``loss_sum`` and ``count`` ``[K]``."""

        def losses(rows: slice, net: NodeSeq2Seq) -> Tensor:
            pred = net(
                x[:, :, rows],
                y_tod[..., rows],
                None if h_g is None else h_g[:, rows],
                targets=y[..., rows],
                teacher=teacher[:, rows],
            )
            per_node, sums, counts = self._loss(pred, y[..., rows], t[rows], rows)
            loss_sum[rows] += sums.double()
            count[rows] += counts.double()
            return per_node

        return losses

    def _loss(
        self, pred: Tensor, y: Tensor, t: Tensor, rows: slice = slice(None)
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-node mean squared error ``[K]`` (unmasked unless configured), sums, counts;
        ``rows``: the worker's nodes that ``pred``, ``y`` and ``t`` hold (default all)."""
        return masked_mse(pred, y, self._loss_mask(t, rows))

    def _loss_mask(self, t: Tensor, rows: slice = slice(None)) -> Tensor | None:
        """Where the targets of the flat time index ``t`` ``[k, B, T_in + H]`` (rows
        ``rows`` of the worker's nodes) were observed, ``[B, H, k]`` float; None when the
        loss is not masked (``federation.loss_masked``)."""
        if not self.cfg.federation.loss_masked:
            return None
        k = torch.arange(self.num_nodes, device=self.device)[rows, None, None]
        return self.observed[k, t[:, :, self.in_steps :]].permute(1, 2, 0).float()

    # ------------------------------------------------------------------ phases
    def local_train(self, payload: P.Payload) -> P.Payload:
        """R_c epochs on the node's own windows with last round's h_G fixed (step 1)."""
        fed = self.cfg.federation
        self.round = int(payload[P.ROUND])
        self._load_global(payload)
        dp_fedavg = dp.fedavg_dp(self.privacy, str(fed.aggregate))
        start = (  # the global model every node starts from (its update is clipped)
            {k: v.detach().clone() for k, v in self.net.stacked_state().items()}
            if dp_fedavg is not None
            else None
        )
        if self.optimizer is None or fed.reset_client_optimizer:
            self.optimizer = make_adam(
                self.net.parameters(), lr=fed.lr, weight_decay=fed.weight_decay
            )
        loss_sum, count, step = self.train_epochs(
            int(payload[P.STEP]), self.optimizer, self._fmtl_term(payload)
        )
        return self.local_reply(payload, start, loss_sum, count, step)

    def train_epochs(
        self, step: int, optimizer: torch.optim.Optimizer, fmtl: Any = None, clients: int = 1
    ) -> tuple[Tensor, Tensor, int]:
        """The local epochs' batches from optimizer step ``step`` (``fmtl``: FMTL's
        regulariser or None); returns loss sums and counts ``[K]`` and the next step.
        ``clients``: how many clients these nodes stand for (progress counts their windows)."""
        fed = self.cfg.federation
        s = len(self.series.starts[P.TRAIN])
        bs = int(fed.batch_size)
        loss_sum = torch.zeros(self.num_nodes, dtype=torch.float64, device=self.device)
        count = torch.zeros_like(loss_sum)
        use_hg = self.cfg.model.graph_embedding
        h_g_train = self.h_g_train if use_hg else None  # [S_train, K, L, H]
        if use_hg and h_g_train is None:
            raise RuntimeError(f"{P.LOCAL_TRAIN} before {P.CONFIGURE}: no h_G for the windows")
        k_ar = torch.arange(self.num_nodes, device=self.device)[:, None]
        self.net.train()
        params = list(self.net.parameters())
        grad_buffers = [torch.empty_like(p) for p in params]  # every row written per batch
        groups = self._groups(trainable=True)
        for epoch in range(int(fed.local_epochs)):
            perm = torch.from_numpy(
                rng.permutations(
                    self.cfg.seed, self.series.nodes, self.round, "local", s, extra=epoch
                )
            ).to(self.device)
            for b in range(math.ceil(s / bs)):
                idx = perm[:, b * bs : (b + 1) * bs]  # [K, B] per-node window positions
                x, x_last, y_tod, y, t = self._gather(P.TRAIN, idx)
                h_g = (
                    h_g_train[idx, k_ar].transpose(0, 1) if h_g_train is not None else None
                )  # [B, K, L, H]
                teacher = self._teacher("local", step, b)
                losses = self.group_losses(x, y_tod, h_g, y, t, teacher, loss_sum, count)
                group_gradients(groups, grad_buffers, losses)
                if fmtl is not None:  # couples neighbours' weights: on the whole group
                    for g_all, g in zip(
                        grad_buffers, torch.autograd.grad(fmtl().sum(), params), strict=True
                    ):
                        g_all += g
                for p, g_all in zip(params, grad_buffers, strict=True):
                    p.grad = g_all
                optimizer.step()
                step += 1
                progress.advance(idx.shape[1] * clients)
        self.net.zero_grad(set_to_none=True)  # keep only the weights between messages:
        return loss_sum, count, step

    def local_reply(
        self,
        payload: P.Payload,
        start: dict[str, Tensor] | None,
        loss_sum: Tensor,
        count: Tensor,
        step: int,
    ) -> P.Payload:
        """The local phase's reply after training (``start``: the model before it, kept
        for a DP-clipped update): the weights for FedAvg, examples, losses, next step."""
        fed = self.cfg.federation
        if fed.reset_client_optimizer:  # grads + Adam moments were 3/4 of a node's memory
            self.optimizer = None
        dp_fedavg = dp.fedavg_dp(self.privacy, str(fed.aggregate))
        out: P.Payload = {}
        if str(fed.aggregate) != "none":  # local / AT w/o FedAvg keep their models at home
            state = self.net.stacked_state()
            if dp_fedavg is not None and start is not None:
                clip = dp_fedavg.fedavg.clip
                assert clip is not None  # fedavg_dp: the FedAvg mechanism is active
                # DP: each node's update w_k - w_global clipped to C
                state = dp.clip_updates(start, state, float(clip))
                if dp_fedavg.fedavg_noise_at == "node":  # and noised here (docs/privacy.md)
                    if P.DP_NODES not in payload:
                        raise ValueError(
                            f"{P.LOCAL_TRAIN} with privacy.fedavg.noise_at=node needs "
                            f"{P.DP_NODES!r} (the nodes asked this round): the "
                            "server runs another privacy config"
                        )
                    std = dp.node_update_noise_std(dp_fedavg.fedavg, int(payload[P.DP_NODES]))
                    state = dp.noise_updates(state, std, self._replay_seeds("fedavg_node", 0))
            out = {f"{P.WEIGHTS_PREFIX}{k}": v.cpu().numpy() for k, v in state.items()}
        s = len(self.series.starts[P.TRAIN])
        out[P.NUM_EXAMPLES] = np.full(self.num_nodes, s * int(fed.local_epochs), np.int64)
        out |= self._loss_reply(loss_sum, count)
        out[P.STEP] = step
        return out

    def _fmtl_term(self, payload: P.Payload) -> Any:
        r"""FMTL's graph regulariser (docs/method.md §6), or None without neighbour weights.

        Returns a callable giving ``[K]``: :math:`\lambda \sum_m A_{km} \lVert w_k - w_m \rVert_2`
        (not squared, as the authors' code), all parameters flattened, the neighbours'
        weights ``w_m`` fixed at the round's snapshot.
        """
        n = len(P.NBR_PREFIX)
        nbr = {k[n:]: v for k, v in payload.items() if k.startswith(P.NBR_PREFIX)}
        if not nbr:
            return None
        names = [name for name, _ in self.net.named_parameters()]
        if set(nbr) != set(names):
            raise ValueError(
                f"FMTL neighbour weights do not match the node model: "
                f"missing {sorted(set(names) - set(nbr))}"
            )
        w_nbr = torch.cat(
            [
                torch.as_tensor(np.asarray(nbr[name]), device=self.device).flatten(1).double()
                for name in names
            ],
            dim=1,
        )  # [M, D]
        a = torch.as_tensor(
            np.asarray(payload[P.NBR_WEIGHT]), device=self.device
        ).double()  # [K, M]
        lam = float(self.cfg.federation.fmtl_lambda)

        def term() -> Tensor:
            w = torch.cat([p.flatten(1) for p in self.net.parameters()], dim=1).double()  # [K, D]
            # pairwise differences, not the |w|^2 + |w_m|^2 - 2 w.w_m expansion: exactly 0 at
            # w_k == w_m (round 1, all nodes equal), where cdist's gradient is 0 (a subgradient)
            dist = torch.cdist(w, w_nbr, compute_mode="donot_use_mm_for_euclid_dist")  # [K, M]
            return (lam * (a * dist).sum(1)).float()

        return term

    def keep_model(self, payload: P.Payload) -> P.Payload:
        """Methods whose nodes keep their own models: remember or restore the best one."""
        action = str(payload[P.ACTION])
        if action == P.KEEP_BEST:
            self.best_model = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            if self.store is not None:  # the node's own disk, for inference after training
                self.store.mkdir(parents=True, exist_ok=True)
                for k, sid in enumerate(self.series.sensor_ids):
                    torch.save(
                        {n: v.cpu() for n, v in self.net.node_state(k).items()},
                        self._own_file(sid),
                    )
        elif action == P.RESTORE_BEST:
            if self.best_model is None:
                raise RuntimeError("restore_best before any keep_best")
            self.net.load_state_dict(self.best_model)
        else:
            raise ValueError(
                f"unknown {P.ACTION} {action!r}; expected {P.KEEP_BEST} or {P.RESTORE_BEST}"
            )
        return {}

    def _own_file(self, sensor_id: str) -> Path:
        assert self.store is not None
        return self.store / (safe_name(sensor_id) + ".pt")

    @torch.no_grad()
    def _load_own(self) -> None:
        """Load every hosted sensor's own best model from the node's store."""
        files = (
            [self._own_file(s) for s in self.series.sensor_ids] if self.store is not None else []
        )
        if self.store is None or not all(f.is_file() for f in files):
            raise RuntimeError(
                f"{P.CONFIGURE} with {P.OWN_MODEL}: no kept model for sensors "
                f"{self.series.sensor_ids[:3]} in {self.store}. Fix: train the "
                "run with this version (it writes <run>/node_store/) and pass "
                "that store to the node"
            )
        states = [torch.load(f, map_location="cpu") for f in files]
        self.net.load_stacked_state({n: torch.stack([st[n] for st in states]) for n in states[0]})

    def _noisy_inputs(self, level: float) -> Tensor:
        """Inputs ``[K, T, F]`` with Gaussian noise on the observed speeds (inference only).

        The noise on sensor k at step t has std ``level x`` k's training std (original units)
        and depends only on (seed, sensor, t): every window that holds step t sees the same
        reading, whatever the grouping of sensors into clients.
        """
        if self._noisy is not None and self._noisy[0] == level:
            return self._noisy[1]
        st = self._input_stats()
        count = np.maximum(np.asarray(st["count"], np.float64), 1.0)
        mean = np.asarray(st["sum"], np.float64) / count
        std = np.sqrt(np.maximum(np.asarray(st["sumsq"], np.float64) / count - mean**2, 0.0))
        inputs = self.scaled_inputs
        t_len = inputs.shape[1]
        z = rng.normals(int(self.cfg.seed), self.series.nodes, 0, "noise", t_len)  # [K, T]
        sigma = level * std / np.broadcast_to(self.fitted_scaler.std, std.shape)  # scaled units [K]
        noise = (z * sigma[:, None] * self.series.mask.T).astype(np.float32)  # observed only
        noisy = inputs.clone()
        noisy[..., 0] += torch.from_numpy(noise).to(self.device)
        self._noisy = (level, noisy)
        return noisy

    # ------------------------------------------------------------------ split learning
    def _sl_batch(self, payload: P.Payload) -> tuple[Tensor, ...]:
        batch = torch.as_tensor(np.asarray(payload[P.BATCH]), device=self.device)  # [B]
        return self._gather(P.TRAIN, batch.expand(self.num_nodes, -1))

    @torch.no_grad()
    def sl_encode(self, payload: P.Payload) -> P.Payload:
        """Split learning, step 1: h_c of a batch with the node's current model."""
        self.net.eval()
        h_c = self.net.encode(self._sl_batch(payload)[0])
        h_c = self._private(
            "sl_h_c", h_c, int(payload.get(P.ROUND, self.round)), int(payload.get(P.STEP, 0))
        )
        return {P.H_C: h_c.cpu().numpy()}

    def _sl_forward(self, h_c: Tensor, h_g: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.sl_pending is None:
            raise RuntimeError(f"split-learning decode without a pending {P.SL_DECODE} batch")
        x, x_last, y_tod, y, t = self._sl_batch(self.sl_pending)
        teacher = self._teacher("sl", step, 0)
        self.net.train()
        pred = self.net.decode(x_last, y_tod, h_c, h_g, targets=y, teacher=teacher)
        return self._loss(pred, y, t)

    def sl_decode(self, payload: P.Payload) -> P.Payload:
        """Split learning, step 2: decode with the received h_G; return dL_k/dh_G."""
        self.round = int(payload[P.ROUND])
        self.sl_pending = {
            P.BATCH: np.asarray(payload[P.BATCH]),
            P.STEP: int(payload[P.STEP]),
            P.H_G: torch.tensor(np.asarray(payload[P.H_G]), device=self.device),
        }
        with torch.no_grad():
            h_c = self.net.encode(self._sl_batch(self.sl_pending)[0])
        h_g = self.sl_pending[P.H_G].clone().requires_grad_(True)
        per_node, sums, counts = self._sl_forward(h_c, h_g, self.sl_pending[P.STEP])
        (grad,) = torch.autograd.grad(per_node.sum(), h_g)
        grad = self._private("sl_grad", grad, self.round, self.sl_pending[P.STEP])
        return {P.GRAD: grad.cpu().numpy()} | self._loss_reply(sums, counts)

    def _private(self, kind: str, x: Tensor, round_: int, counter: int) -> Tensor:
        """``x`` ``[S, K, L, H]`` as it may leave the node: with ``privacy`` on, every
        window's ``[L, H]`` slice clipped and noised (:mod:`cnfgnn.privacy.dp`; the noise
        keyed by (seed, node, round, kind, counter)); unchanged otherwise."""
        if self.privacy is None:
            return x
        mech = self.privacy.h_c if kind in ("h_c", "sl_h_c") else self.privacy.grad
        return dp.privatize(x, mech, self._replay_seeds(kind, counter, round_))

    def _replay_seeds(self, kind: str, counter: int, round_: int | None = None) -> list[int] | None:
        """None (OS-random noise), or with ``privacy.insecure_replayable_noise`` the config-keyed
        seeds of this release, one per node (anyone with the config can replay them)."""
        if self.privacy is None or not self.privacy.insecure_replayable_noise:
            return None
        r = self.round if round_ is None else round_
        return dp.release_seeds(int(self.cfg.seed), self.series.nodes, r, kind, counter)

    def _loss_reply(self, sums: Tensor, counts: Tensor) -> P.Payload:
        """Training-loss sums and counts ``[K]`` for the reply; none under ``privacy=dp``
        unless ``privacy.report_train_loss`` (they are released without noise)."""
        if self.privacy is not None and not self.privacy.report_train_loss:
            return {}
        return {
            P.LOSS_SUM: sums.double().cpu().numpy(),
            P.LOSS_COUNT: counts.double().cpu().numpy(),
        }

    def sl_backward(self, payload: P.Payload) -> P.Payload:
        """Split learning, step 3: backpropagate both paths into the node model and step.

        The forward pass is recomputed (the node model has not changed since step 2), so
        nothing but tensors is kept between messages. Node k's encoder gets the gradient
        through its own decoder plus the GN's ``dL/dh_c`` sent by the server.
        """
        if self.sl_pending is None:
            raise RuntimeError(f"{P.SL_BACKWARD} without a pending {P.SL_DECODE}")
        fed = self.cfg.federation
        if self.optimizer is None:
            self.optimizer = make_adam(
                self.net.parameters(), lr=fed.lr, weight_decay=fed.weight_decay
            )
        g = torch.as_tensor(np.asarray(payload[P.GRAD_H_C]), device=self.device)
        h_c = self.net.encode(self._sl_batch(self.sl_pending)[0])
        per_node, _, _ = self._sl_forward(h_c, self.sl_pending[P.H_G], self.sl_pending[P.STEP])
        self.optimizer.zero_grad(set_to_none=True)
        (per_node.sum() + (h_c * g).sum()).backward()
        self.optimizer.step()
        self.sl_pending = None
        return {}

    @torch.no_grad()
    def encode(self, payload: P.Payload) -> P.Payload:
        """h_c for every window of a split with the (new) global model (step 2)."""
        self._load_global(payload)
        split = str(payload[P.SPLIT])
        self.net.eval()
        self.h_c[split] = self.encode_windows(split, self._groups(trainable=False))
        up = self._private("h_c", self.h_c[split], self.round, P.SPLITS.index(split))
        return {P.H_C: up.cpu().numpy().copy()}  # the node decodes from its own clean h_c

    def encode_windows(self, split: str, groups: list[tuple[slice, NodeSeq2Seq]]) -> Tensor:
        """``h_c`` of every window of ``split``, ``[S, K, L, H]``, by the node groups given
        (``(rows, net)`` pairs of :meth:`NodeSeq2Seq.node_groups`; the central limit passes
        its own model's) in ``federation.eval_batch_size`` chunks of windows."""
        s = len(self.series.starts[split])
        bs = int(self.cfg.federation.eval_batch_size)
        parts = []
        for b in range(0, s, bs):
            idx = torch.arange(b, min(b + bs, s), device=self.device).expand(self.num_nodes, -1)
            x = self._gather(split, idx)[0]
            parts.append(
                torch.cat([net.encode(x[:, :, rows]) for rows, net in groups], dim=1)
            )  # [B, K, L, H]
            progress.advance(idx.shape[1])
        if parts:
            return torch.cat(parts)
        m = self.cfg.model
        return torch.zeros(0, self.num_nodes, m.num_layers, m.hidden_size, device=self.device)

    def split_batch(self, payload: P.Payload) -> SplitBatch:
        """What this client decodes in the split step for a checked request (step 3)."""
        batch = torch.as_tensor(np.asarray(payload[P.BATCH]), device=self.device)  # [B]
        idx = batch.expand(self.num_nodes, -1)  # every node decodes the same windows
        _, x_last, y_tod, y, t = self._gather(P.TRAIN, idx)
        return SplitBatch(
            x_last=x_last,
            y_tod=y_tod,
            y=y,
            mask=self._loss_mask(t),
            h_c=self.h_c[P.TRAIN][batch],  # [B, K, L, H], node model frozen here
            h_g=torch.tensor(np.asarray(payload[P.H_G]), device=self.device),
            teacher=self._teacher("split", int(payload[P.STEP]), 0),
        )

    def split_step(self, payload: P.Payload) -> P.Payload:
        """Decode a server batch with the received h_G; return dL_k/dh_G (step 3)."""
        self.round = int(payload[P.ROUND])
        self.net.train()
        grad, sums, counts = split_decode(self._groups(trainable=False), self.split_batch(payload))
        return self.split_reply(grad, sums, counts, int(payload[P.STEP]))

    def split_reply(self, grad: Tensor, sums: Tensor, counts: Tensor, step: int) -> P.Payload:
        """The split step's reply from :func:`split_decode`'s rows of this client."""
        grad = self._private("grad", grad, self.round, step)
        return {P.GRAD: grad.cpu().numpy()} | self._loss_reply(sums, counts)

    def embed(self, payload: P.Payload) -> P.Payload:
        """Store h_G for every training window: next round's fixed input (step 4)."""
        self.h_g_train = torch.tensor(np.asarray(payload[P.H_G]), device=self.device)
        return {}

    @torch.no_grad()
    def evaluate(self, payload: P.Payload) -> P.Payload:
        """Error sums per node and horizon for a split, decoding with the received h_G.

        ``REPORT`` (+ ``REPORT_NODES``): forecasts of those windows and sensors are written
        to the node's store; they go up (``FORECAST`` ``[W, H, R]``) only with ``RELEASE``
        and this node's own ``predictions.release=true``.
        """
        split = str(payload[P.SPLIT])
        if self.scaler is None:
            raise RuntimeError("evaluate before configure")
        if payload.get(P.RELEASE) and not forecasts_released(self.cfg):
            raise PermissionError(
                f"{P.EVALUATE}: the server asked for this node's forecasts, but this node's "
                "config keeps them (predictions.release=false). Fix: run with "
                "predictions.release=true on the server and the nodes, or not at all"
            )
        self._load_global(payload)
        if P.H_G in payload:  # CNFGNN: decode from the h_c this node sent up for this split
            h_g_all = torch.as_tensor(np.asarray(payload[P.H_G]), device=self.device)
            if split not in self.h_c or len(self.h_c[split]) != len(h_g_all):
                raise ValueError(
                    f"h_G for {len(h_g_all)} {split} windows, but this node "
                    f"encoded {len(self.h_c.get(split, []))}; send {P.ENCODE} first"
                )
        else:  # no graph embedding: encode here with the current model
            h_g_all = None
            self.encode({P.SPLIT: split})
        s = len(self.series.starts[split])
        bs = int(self.cfg.federation.eval_batch_size)
        mean = torch.as_tensor(self.fitted_scaler.mean, dtype=torch.float32, device=self.device)
        std = torch.as_tensor(self.fitted_scaler.std, dtype=torch.float32, device=self.device)
        self.net.eval()
        total: dict[str, Tensor] = {}
        report = np.asarray(payload.get(P.REPORT, np.zeros(0, np.int64)), np.int64)  # [W]
        keep = self._report_columns(payload)  # [R] hosted positions whose forecasts are kept
        forecast = np.zeros((len(report), self.out_steps, len(keep)), np.float32)
        for b in range(0, s, bs):
            batch = torch.arange(b, min(b + bs, s), device=self.device)
            _, x_last, y_tod, y, t = self._gather(split, batch.expand(self.num_nodes, -1))
            h_g = h_g_all[batch] if h_g_all is not None else None
            pred = self.net.decode(x_last, y_tod, self.h_c[split][batch], h_g)[..., 0]
            wanted = (report >= b) & (report < b + len(batch))
            if wanted.any():  # kept on this node (sent up only with predictions.release)
                forecast[wanted] = (pred[report[wanted] - b] * std + mean)[..., keep].cpu().numpy()
            for key, v in self.batch_errors(pred, y, t).items():
                total[key] = total[key] + v if key in total else v
            progress.advance(len(batch))
        out: P.Payload = {P.ERR_PREFIX + k: v.cpu().numpy() for k, v in total.items()}
        if len(report):
            self._keep_forecasts(split, report, keep, forecast)
            if payload.get(P.RELEASE):
                out[P.FORECAST] = forecast
        return out

    def _report_columns(self, payload: P.Payload) -> np.ndarray:
        """Positions ``[R]`` among the hosted sensors of ``REPORT_NODES`` (default: all)."""
        if P.REPORT_NODES not in payload:
            return np.arange(self.num_nodes)
        pos = {int(g): k for k, g in enumerate(self.series.nodes)}
        return np.asarray([pos[int(g)] for g in np.asarray(payload[P.REPORT_NODES])], np.int64)

    def _keep_forecasts(
        self, split: str, report: np.ndarray, keep: np.ndarray, forecast: np.ndarray
    ) -> None:
        """Write the kept forecasts ``[W, H, R]`` to this node's own disk, a file per sensor
        (:func:`cnfgnn.results.write_node_forecast`); without a store they are not kept."""
        if self.store is None:
            return
        t_index = (
            np.asarray(self.series.starts[split])[report] + self.in_steps
        )  # first forecast step
        for j, k in enumerate(keep.tolist()):
            write_node_forecast(
                self.store, self.series.sensor_ids[k], split, t_index, forecast[:, :, j]
            )

    def batch_errors(self, pred: Tensor, y: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Error sums ``[K, H]`` (both metric protocols) of scaled predictions ``[B, H, K]``
        against the windows ``t`` ``[K, B, T_in + H]`` from :meth:`_gather`."""
        mean = torch.as_tensor(self.fitted_scaler.mean, dtype=torch.float32, device=self.device)
        std = torch.as_tensor(self.fitted_scaler.std, dtype=torch.float32, device=self.device)
        k_ar = torch.arange(self.num_nodes, device=self.device)[:, None, None]
        t_out = t[:, :, self.in_steps :]  # [K, B, H]
        target = self.raw[k_ar, t_out].permute(1, 2, 0)  # [B, H, K]
        mask = self.observed[k_ar, t_out].permute(1, 2, 0)
        return error_sums(pred * std + mean, target, mask, pred, y)

    # ------------------------------------------------------------------ inference
    def _windows_ending(self, payload: P.Payload) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs of the windows whose last input step is ``payload[ENDS]`` (``[W]``).

        Returns x ``[W, T_in, K, F]``, x_last ``[W, K, F]`` and y_tod ``[W, H, K]`` (time of
        day of the forecast steps: from the series where known, extrapolated past its end).
        """
        if self.inputs is None or self.scaler is None:
            raise RuntimeError(
                f"{P.PREDICT} before {P.CONFIGURE}: send the scaler and the node model first"
            )
        ends = np.asarray(payload[P.ENDS], dtype=np.int64).reshape(-1)
        t_len = self.inputs.shape[1]
        bad = ends[(ends < self.in_steps - 1) | (ends >= t_len)]
        if bad.size:
            raise ValueError(
                f"window ends {bad[:5].tolist()} outside [{self.in_steps - 1}, "
                f"{t_len - 1}]: a window needs {self.in_steps} steps of history"
            )
        e = torch.as_tensor(ends, device=self.device)
        t_in = e[:, None] + torch.arange(1 - self.in_steps, 1, device=self.device)  # [W, T_in]
        level = float(payload.get(P.NOISE, 0.0))
        inputs = self._noisy_inputs(level) if level > 0 else self.inputs
        x = inputs[:, t_in].permute(1, 2, 0, 3)  # [K, W, T_in, F] -> [W, T_in, K, F]
        tod = self.series.time_of_day  # [T]
        t_out = ends[:, None] + np.arange(1, self.out_steps + 1)  # [W, H]
        day = np.diff(tod.astype(np.float64)) % 1.0  # steps as fractions of a day
        step = float(np.median(day)) if day.size else 0.0
        past_end = (tod[-1] + (t_out - (t_len - 1)) * step) % 1.0
        y_tod = np.where(t_out < t_len, tod[np.minimum(t_out, t_len - 1)], past_end)
        y_tod = torch.as_tensor(y_tod.astype(np.float32), device=self.device)  # [W, H]
        return x, x[:, -1], y_tod[:, :, None].expand(-1, -1, self.num_nodes).contiguous()

    @torch.no_grad()
    def predict_encode(self, payload: P.Payload) -> P.Payload:
        """h_c ``[W, K, L, H]`` of the windows ending at ``ENDS`` (inference, step 1)."""
        x = self._windows_ending(payload)[0]
        bs = int(self.cfg.federation.eval_batch_size)
        self.net.eval()
        h_c = [self.net.encode(x[b : b + bs]) for b in range(0, len(x), bs)]
        if not h_c:  # no windows asked: an empty [0, K, L, H]
            m = self.cfg.model
            return {P.H_C: np.zeros((0, self.num_nodes, m.num_layers, m.hidden_size), np.float32)}
        return {P.H_C: torch.cat(h_c).cpu().numpy()}

    @torch.no_grad()
    def predict(self, payload: P.Payload) -> P.Payload:
        """Forecasts ``[W, H, K]`` in original units of the windows ending at ``ENDS``.

        Decodes with the received h_G ``[W, K, L, H]`` (models with a graph embedding) from
        the same h_c the node sent up (re-encoded: nothing is kept between messages). The
        reply holds only the forecasts, never inputs or targets.
        """
        x, x_last, y_tod = self._windows_ending(payload)
        h_g = None
        if self.cfg.model.graph_embedding:
            if P.H_G not in payload:
                raise ValueError(
                    f"{P.PREDICT}: this node model decodes with a graph "
                    f"embedding; send {P.H_G} for every window"
                )
            h_g = torch.as_tensor(np.asarray(payload[P.H_G]), device=self.device)
            if tuple(h_g.shape[:2]) != (len(x), self.num_nodes):
                raise ValueError(
                    f"{P.PREDICT}: h_G has shape {tuple(h_g.shape)} for "
                    f"{len(x)} windows of {self.num_nodes} nodes"
                )
        bs = int(self.cfg.federation.eval_batch_size)
        mean = torch.as_tensor(self.fitted_scaler.mean, dtype=torch.float32, device=self.device)
        std = torch.as_tensor(self.fitted_scaler.std, dtype=torch.float32, device=self.device)
        self.net.eval()
        out = []
        for b in range(0, len(x), bs):
            h_c = self.net.encode(x[b : b + bs])  # [B, K, L, H]
            pred = self.net.decode(
                x_last[b : b + bs], y_tod[b : b + bs], h_c, None if h_g is None else h_g[b : b + bs]
            )[..., 0]
            out.append(pred * std + mean)  # [B, H, K] original units
        fc = torch.cat(out) if out else torch.zeros(0, self.out_steps, self.num_nodes)
        return {P.FORECAST: fc.cpu().numpy().astype(np.float32)}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes between messages (the Flower engines persist it).

        The series and the config are not included: a restored worker is built from the
        same series and config, then :meth:`load_state_dict` is applied. Keep this in step
        with the attributes the handlers set.
        """

        def cpu(t: Tensor | None) -> Tensor | None:  # a snapshot, not a view
            return None if t is None else t.detach().to("cpu", copy=True)

        return {
            "model": {k: cpu(v) for k, v in self.net.state_dict().items()},
            "optimizer": None
            if self.optimizer is None
            else copy.deepcopy(self.optimizer.state_dict()),
            "scaler": None
            if self.scaler is None
            else (np.asarray(self.scaler.mean), np.asarray(self.scaler.std)),
            "inputs": cpu(self.inputs),
            "raw": cpu(getattr(self, "raw", None)),
            "observed": cpu(getattr(self, "observed", None)),
            "h_c": {k: cpu(v) for k, v in self.h_c.items()},
            "h_g_train": cpu(self.h_g_train),
            "round": self.round,
            "best_model": None
            if self.best_model is None
            else {k: cpu(v) for k, v in self.best_model.items()},
            "sl_pending": None
            if self.sl_pending is None
            else {k: cpu(v) if isinstance(v, Tensor) else v for k, v in self.sl_pending.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on this worker's device)."""

        def dev(t: Tensor) -> Tensor:
            return t.to(self.device)

        def dev_or_none(t: Tensor | None) -> Tensor | None:
            return None if t is None else dev(t)

        self.net.load_state_dict(state["model"])
        self._noisy = None  # derived from the inputs, which this may replace
        self.optimizer = None
        if state["optimizer"] is not None:
            fed = self.cfg.federation
            self.optimizer = make_adam(
                self.net.parameters(), lr=fed.lr, weight_decay=fed.weight_decay
            )
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler = None if state["scaler"] is None else Scaler(*state["scaler"])
        self.inputs = dev_or_none(state["inputs"])
        for name in ("raw", "observed"):
            if state[name] is not None:
                setattr(self, name, dev(state[name]))
        self.h_c = {k: dev(v) for k, v in state["h_c"].items()}
        self.h_g_train = dev_or_none(state["h_g_train"])
        self.round = int(state["round"])
        best = state.get("best_model")
        self.best_model = None if best is None else {k: dev(v) for k, v in best.items()}
        pend = state.get("sl_pending")
        self.sl_pending = (
            None
            if pend is None
            else {k: dev(v) if isinstance(v, Tensor) else v for k, v in pend.items()}
        )
