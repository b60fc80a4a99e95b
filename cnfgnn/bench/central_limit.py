"""The CNFGNN round done centrally: one model over all nodes, no messaging (the benchmark's limit).

The same math as :class:`~cnfgnn.federation.rounds.Orchestrator` driving one
:class:`~cnfgnn.federation.node.NodeWorker` that hosts every node, without payloads, numpy
round trips or client bookkeeping:

1. local training of a :class:`NodeSeq2Seq` with ``K = N`` stacked per-node weights
   (per-node window shuffles and scheduled-sampling coins from :mod:`cnfgnn.rng`), then
   FedAvg as a weighted mean over the ``K`` rows;
2. ``h_c`` of every training window;
3. split learning of the GN end to end: ``h_G = GN(h_c)``, decode, node-mean loss,
   one backward into the GN only (the node model is frozen here), one Adam step;
4. ``h_G`` of every training window (no gradient, in ``server_eval_batch_size`` chunks);
5. validation: encode, ``h_G``, decode, error sums.

Randomness, initialisation and batching equal the federated engines', so a round's losses
agree with the in-process engine's up to float rounding (the benchmark reports both). This
module is what "the limit on this hardware" means in ``cnfgnn-bench``; it is not a
training entry point (no early stopping, no checkpoints).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn import rng
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.scaler import global_scaler
from cnfgnn.evaluation.metrics import metrics_from_sums, node_mean_loss
from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import (
    LocalSeries,
    NodeWorker,
    SplitBatch,
    decode_group,
    group_gradients,
)
from cnfgnn.federation.rounds import initial_node_model, seeded
from cnfgnn.federation.server import GraphServer
from cnfgnn.models.node_seq2seq import build_node_model
from cnfgnn.optim import make_adam


class CentralCNFGNN:
    """All nodes in one stacked model and the GN in one process, trained round by round.

    Args:
        cfg: composed config (``dataset``, ``model``, ``federation``, ``seed``).
        data: the whole dataset (every node trains; ``inductive_ratio`` is not supported).
        device: torch device.

    Attributes:
        seconds: phase -> seconds, accumulated over rounds (``local``, ``encode``,
            ``split``, ``embed``, ``val``), the names the orchestrator uses.
    """

    def __init__(self, cfg: Any, data: SensorData, device: torch.device | str = "cpu"):
        if cfg.federation.get("inductive_ratio") is not None:
            raise ValueError(
                "the central limit trains every node; set federation.inductive_ratio=null"
            )
        self.cfg, self.fed, self.device = cfg, cfg.federation, torch.device(device)
        m = cfg.model
        self.in_steps, self.out_steps = int(cfg.dataset.in_steps), int(cfg.dataset.out_steps)
        self.nodes = np.arange(data.num_nodes, dtype=np.int64)
        # batches, coins, losses and error sums: the node's own code over all N nodes
        self.worker = NodeWorker(
            LocalSeries.from_data(data, self.nodes, cfg.dataset),
            cfg,
            self.device,
            build_model=False,
        )
        conf: P.Payload = {}
        if self.fed.scaling == "global":  # per-node scaling: configure computes it
            sc = global_scaler([self.worker._input_stats()])
            conf = {P.SCALER_MEAN: np.asarray(sc.mean), P.SCALER_STD: np.asarray(sc.std)}
        self.worker.configure(conf)
        self.starts = self.worker.series.starts
        n = data.num_nodes
        self.model = build_node_model(m, n).to(self.device)
        self.model.load_global_state(
            {k: torch.from_numpy(v) for k, v in initial_node_model(cfg).items()}
        )
        with seeded(int(cfg.seed)):  # the orchestrator's GN init
            self.server = GraphServer(m, lr=self.fed.server_lr, device=self.device)
        self.graph = self.server.graph(np.asarray(data.adjacency))
        s_train = len(self.starts["train"])
        self.h_g_train = torch.zeros(s_train, n, m.num_layers, m.hidden_size, device=self.device)
        self.k_ar = torch.arange(n, device=self.device)
        self.step = 0
        self.seconds: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ helpers
    def _gather(self, split: str, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.worker._gather(split, idx)

    def _teacher(self, phase: str, round_: int, step: int, batch: int) -> Tensor:
        self.worker.round = round_  # the node draws its coins keyed by its round
        return self.worker._teacher(phase, step, batch)

    def _encode_all(self, split: str) -> Tensor:
        groups = self.model.node_groups(self.cfg.get("node_chunk"), trainable=False)  # as nodes do
        return self.worker.encode_windows(split, groups)  # [S, N, L, H]

    def _embed_all(self, h_c: Tensor) -> Tensor:
        bs = int(self.fed.server_eval_batch_size)
        self.server.gn.eval()
        return torch.cat(
            [self.server.gn(h_c[b : b + bs], *self.graph) for b in range(0, h_c.shape[0], bs)]
        )

    def _timed(self, phase: str, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - t0

    # ------------------------------------------------------------------ one round
    def round(self, round_: int) -> dict[str, float]:
        """One CNFGNN round + validation; returns its losses (the orchestrator's names)."""
        rec: dict[str, float] = {}
        use_hg = bool(self.cfg.model.graph_embedding)
        n = len(self.nodes)
        # 1. local training + FedAvg
        t0 = time.perf_counter()
        opt = make_adam(self.model.parameters(), lr=self.fed.lr, weight_decay=self.fed.weight_decay)
        s, bs = len(self.starts["train"]), int(self.fed.batch_size)
        loss = count = 0.0
        self.model.train()
        chunk = self.cfg.get("node_chunk")  # the engines' cache-sized runs of nodes
        params = list(self.model.parameters())
        buffers = [torch.empty_like(p) for p in params]
        groups = self.model.node_groups(chunk, trainable=True)
        for epoch in range(int(self.fed.local_epochs)):
            perm = torch.from_numpy(
                rng.permutations(int(self.cfg.seed), self.nodes, round_, "local", s, extra=epoch)
            ).to(self.device)
            for b in range(math.ceil(s / bs)):
                idx = perm[:, b * bs : (b + 1) * bs]
                x, _, y_tod, y, t = self._gather("train", idx)
                h_g = self.h_g_train[idx, self.k_ar[:, None]].transpose(0, 1) if use_hg else None
                teacher = self._teacher("local", round_, self.step, b)
                sums = torch.zeros(n, dtype=torch.float64, device=self.device)
                counts = torch.zeros_like(sums)
                losses = self.worker.group_losses(x, y_tod, h_g, y, t, teacher, sums, counts)
                group_gradients(groups, buffers, losses)
                for p, g in zip(params, buffers, strict=True):
                    p.grad = g
                opt.step()
                loss, count = loss + float(sums.sum()), count + float(counts.sum())
                self.step += 1
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():  # FedAvg: every node trained on S windows, so uniform == samples
            for p in self.model.parameters():
                p.copy_(p.mean(0, keepdim=True).expand_as(p))
        rec["train_loss"] = loss / max(count, 1.0)
        self._timed("local", t0)
        if use_hg:
            # 2. encodings
            t0 = time.perf_counter()
            self.model.eval()
            with torch.no_grad():
                h_c = self._encode_all("train")
            self._timed("encode", t0)
            # 3. split learning, end to end
            t0 = time.perf_counter()
            sbs = int(self.fed.server_batch_size) * int(self.fed.server_batches_per_trip)
            params = list(self.server.gn.parameters())
            loss = count = 0.0
            self.model.train()
            frozen = self.model.node_groups(chunk, trainable=False)  # no decoder gradients
            for epoch in range(int(self.fed.server_epochs)):
                order = rng.permutations(
                    int(self.cfg.seed), np.zeros(1, np.int64), round_, "server", s, extra=epoch
                )[0]
                for b in range(math.ceil(s / sbs)):
                    batch = torch.from_numpy(np.sort(order[b * sbs : (b + 1) * sbs])).to(
                        self.device
                    )
                    self.server.gn.train()
                    h_c_b = h_c[batch]  # [B, N, L, H]
                    h_g = self.server.gn(h_c_b, *self.graph)
                    _, x_last, y_tod, y, t = self._gather("train", batch.expand(n, -1))
                    sb = SplitBatch(
                        x_last=x_last,
                        y_tod=y_tod,
                        y=y,
                        mask=self.worker._loss_mask(t),
                        h_c=h_c_b,
                        h_g=h_g,
                        teacher=self._teacher("split", round_, self.step, 0),
                    )
                    per_node = torch.empty(n, device=self.device)
                    sums, counts = torch.empty(2, n, device=self.device)
                    for rows, net in frozen:  # as NodeWorker.split_step, GN graph kept
                        per_node[rows], sums[rows], counts[rows] = decode_group(
                            rows, net, sb, h_g[:, rows]
                        )
                    self.server.optimizer.zero_grad(set_to_none=True)
                    torch.autograd.backward(per_node.mean(), inputs=params)  # GN only
                    self.server.optimizer.step()
                    loss, count = loss + float(sums.sum()), count + float(counts.sum())
                    self.step += 1
            rec["split_loss"] = loss / max(count, 1.0)
            self._timed("split", t0)
            # 4. embeddings of every training window
            t0 = time.perf_counter()
            with torch.no_grad():
                self.h_g_train = self._embed_all(h_c)
            self._timed("embed", t0)
        # 5. validation
        t0 = time.perf_counter()
        sums_np = self.evaluate("val")
        rec["val_loss"] = node_mean_loss(sums_np)
        rec["val_rmse"] = metrics_from_sums(sums_np)["rmse"]
        self._timed("val", t0)
        return rec

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, np.ndarray]:
        """Error sums ``[N, H]`` per key for a split (encode, GN, decode)."""
        self.model.eval()
        n, s = len(self.nodes), len(self.starts[split])
        h_c = self._encode_all(split)
        h_g = self._embed_all(h_c) if self.cfg.model.graph_embedding else None
        bs = int(self.fed.eval_batch_size)
        total: dict[str, Tensor] = {}
        for b in range(0, s, bs):
            batch = torch.arange(b, min(b + bs, s), device=self.device)
            _, x_last, y_tod, y, t = self._gather(split, batch.expand(n, -1))
            pred = self.model.decode(
                x_last, y_tod, h_c[batch], None if h_g is None else h_g[batch]
            )[..., 0]
            for key, v in self.worker.batch_errors(pred, y, t).items():
                total[key] = total[key] + v if key in total else v
        return {k: v.cpu().numpy() for k, v in total.items()}
