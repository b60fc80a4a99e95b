"""Centralised baselines: the node model (and optionally the GN) trained on pooled data.

``GRU (centralized)`` (``federation=central model=gru_63k|gru_727k``) and ``GRU + GN
(centralized)`` (``federation=central model=cnfgnn``): one model with weights shared by all
nodes, every batch holding B windows x N nodes (nodes are independent sequences of one batch,
as in the authors' code); with the GN, encoder -> GN -> decoder end to end with one Adam.
Data handling (scaling, windows, error sums) is the same :class:`NodeWorker` code the
federated runs use, over all nodes at once; the metrics are the same sums, so the tables
compare like with like. One round is one epoch. Outputs go through the same
:class:`RunWriter` (metrics.jsonl, final.json, checkpoint.pt, predictions.npz).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnfgnn import progress, rng
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.nodes import select_nodes
from cnfgnn.data.scaler import global_scaler
from cnfgnn.evaluation.metrics import metrics_from_sums, node_mean_loss, per_horizon
from cnfgnn.federation import protocol as P
from cnfgnn.federation.node import LocalSeries, NodeWorker
from cnfgnn.federation.rounds import report_selection, seeded
from cnfgnn.federation.server import GraphServer
from cnfgnn.models.node_seq2seq import build_node_model, teacher_forcing_prob
from cnfgnn.results import RunWriter


class CentralModel(torch.nn.Module):
    """Shared node model (K = 1, nodes folded into the batch), optionally with the GN.

    Shapes: x ``[B, T_in, N, F]``, x_last ``[B, N, F]``, y_tod / targets ``[B, H, N]``,
    teacher ``[H, 1]`` -> predictions ``[B, H, N]`` (scaled).
    """

    def __init__(self, cfg: Any, device: torch.device):
        super().__init__()
        m = cfg.model
        with seeded(int(cfg.seed)):  # the same initial node model as the federated runs
            self.node = build_node_model(m, 1)
            self.server = (
                GraphServer(m, lr=cfg.federation.server_lr, device=device)
                if m.graph_embedding
                else None
            )
        self.gn = self.server.gn if self.server is not None else None
        self.to(device)

    def forward(
        self,
        x: Tensor,
        x_last: Tensor,
        y_tod: Tensor,
        graph: tuple[Tensor, Tensor],
        targets: Tensor | None = None,
        teacher: Tensor | None = None,
    ) -> Tensor:
        b, t, n, f = x.shape
        fold = lambda v: v.permute(0, 2, 1).reshape(b * n, -1, 1)  # [B, H, N] -> [B*N, H, 1]
        h_c = self.node.encode(x.permute(0, 2, 1, 3).reshape(b * n, t, 1, f))  # [B*N, 1, L, H]
        h_g = None
        if self.gn is not None:
            h = h_c.reshape(b, n, *h_c.shape[2:])  # [B, N, L, H]
            h_g = self.gn(h, *graph).reshape(h_c.shape)
        pred = self.node.decode(
            x_last.reshape(b * n, 1, f),
            fold(y_tod),
            h_c,
            h_g,
            None if targets is None else fold(targets),
            teacher,
        )
        return pred.reshape(b, n, -1).permute(0, 2, 1)  # [B*N, H, 1, 1] -> [B, H, N]


def _worker(cfg: Any, data: SensorData, nodes: np.ndarray, device: torch.device) -> NodeWorker:
    series = LocalSeries.from_data(data, nodes, cfg.dataset)
    return NodeWorker(series, cfg, device, build_model=False)


class CentralTrainer:
    """Epochs over pooled windows with early stopping; test with the best epoch's weights.

    Args:
        cfg: composed config (``federation=central``).
        data: the whole dataset (this baseline sees every node's series).
        writer: run directory writer.
        progress: one-line progress sink.
        device: torch device.
    """

    def __init__(
        self,
        cfg: Any,
        data: SensorData,
        writer: RunWriter | None,
        progress: Callable[[str], None],
        device: torch.device,
    ):
        self.cfg, self.data, self.writer, self.progress = cfg, data, writer, progress
        self.fed, self.device = cfg.federation, device
        n = data.num_nodes
        ratio = self.fed.inductive_ratio
        self.train_nodes = (
            np.arange(n)
            if ratio is None
            else select_nodes(n, float(ratio), data.locations, seed=int(cfg.seed))
        )
        self.eval_nodes = np.arange(n)
        self.train = _worker(cfg, data, self.train_nodes, device)
        self.eval = self.train if ratio is None else _worker(cfg, data, self.eval_nodes, device)
        stats = self.train._input_stats()
        conf: P.Payload = {}
        if self.fed.scaling == "global":  # the same statistic the federation computes
            sc = global_scaler([stats])
            conf = {P.SCALER_MEAN: np.asarray(sc.mean), P.SCALER_STD: np.asarray(sc.std)}
        for w in {id(self.train): self.train, id(self.eval): self.eval}.values():
            w.configure(dict(conf))
        self.model = CentralModel(cfg, device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.fed.lr, weight_decay=self.fed.weight_decay
        )
        adj = data.adjacency
        gs = self.model.server
        self.train_graph = gs.graph(adj[np.ix_(self.train_nodes, self.train_nodes)]) if gs else None
        self.eval_graph = gs.graph(adj[np.ix_(self.eval_nodes, self.eval_nodes)]) if gs else None
        self.step = 0

    def _teacher(self, epoch: int, batch: int) -> Tensor:
        """One scheduled-sampling coin per decoding step for the whole batch ``[H, 1]``."""
        p = teacher_forcing_prob(self.step, float(self.cfg.model.cl_decay_steps))
        u = rng.uniforms(
            self.cfg.seed,
            np.zeros(1, np.int64),
            epoch,
            "central",
            int(self.cfg.dataset.out_steps),
            extra=batch,
        )
        return torch.from_numpy(u.T <= p).to(self.device)

    def train_epoch(self, epoch: int) -> float:
        w = self.train
        s, bs = len(w.series.starts[P.TRAIN]), int(self.fed.batch_size)
        perm = rng.permutations(int(self.cfg.seed), np.zeros(1, np.int64), epoch, "central", s)[0]
        loss_sum = count = 0.0
        self.model.train()
        for b in range(math.ceil(s / bs)):
            idx = torch.as_tensor(perm[b * bs : (b + 1) * bs], device=self.device)
            x, x_last, y_tod, y, t = w._gather(P.TRAIN, idx.expand(w.num_nodes, -1))
            pred = self.model(x, x_last, y_tod, self.train_graph, y, self._teacher(epoch, b))
            per_node, sums, counts = w._loss(pred[..., None], y, t)
            self.optimizer.zero_grad(set_to_none=True)
            per_node.mean().backward()  # the pooled MSE (every node has the same count)
            self.optimizer.step()
            loss_sum += float(sums.sum())
            count += float(counts.sum())
            self.step += 1
            progress.advance(len(idx))
        return loss_sum / max(count, 1.0)

    @torch.no_grad()
    def evaluate(
        self, split: str, report: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Error sums ``[N, H]`` per key for a split (+ forecasts of ``report`` windows)."""
        w = self.eval
        s, bs = len(w.series.starts[split]), int(self.fed.eval_batch_size)
        self.model.eval()
        total: dict[str, Tensor] = {}
        preds = []
        for b in range(0, s, bs):
            idx = torch.arange(b, min(b + bs, s), device=self.device)
            x, x_last, y_tod, y, t = w._gather(split, idx.expand(w.num_nodes, -1))
            pred = self.model(x, x_last, y_tod, self.eval_graph)  # [B, H, N]
            if report is not None:
                preds.append(pred)
            for k, v in w.batch_errors(pred, y, t).items():
                total[k] = total[k] + v if k in total else v
            progress.advance(len(idx))
        forecast = None
        if report is not None and preds:
            mean = torch.as_tensor(w.scaler.mean, dtype=torch.float32, device=self.device)
            std = torch.as_tensor(w.scaler.std, dtype=torch.float32, device=self.device)
            forecast = (torch.cat(preds)[torch.as_tensor(report)] * std + mean).cpu().numpy()
        return {k: v.cpu().numpy() for k, v in total.items()}, forecast

    def _state(self) -> dict[str, Any]:
        return copy.deepcopy(self.model.state_dict())

    def run(self) -> dict[str, Any]:
        """Epochs with early stopping (continuing from ``checkpoint.pt`` with ``resume=true``),
        then test with the best epoch's weights; returns ``final.json``'s content."""
        t_start = time.perf_counter()
        es = {"best_loss": math.inf, "best_round": 0, "bad_rounds": 0, "best": self._state()}
        ckpt = self.writer.load_checkpoint() if (self.writer and self.cfg.resume) else None
        last, seconds_before = 0, 0.0  # last epoch run; wall time of earlier processes
        if ckpt is not None:
            last, seconds_before, es = self._restore(ckpt)
        epoch = last
        for epoch in range(last + 1, int(self.fed.rounds) + 1):
            if es["bad_rounds"] >= int(self.fed.early_stopping_patience):
                epoch -= 1
                break
            t0 = time.perf_counter()
            with progress.phase("train", len(self.train.series.starts[P.TRAIN])):
                train_loss = self.train_epoch(epoch)
            t1 = time.perf_counter()
            with progress.phase("val", len(self.eval.series.starts[P.VAL])):
                sums, _ = self.evaluate(P.VAL)
            t2 = time.perf_counter()
            val = metrics_from_sums(sums)
            rec = {
                "round": epoch,
                "train_loss": train_loss,
                "val_loss": node_mean_loss(sums),
                "val_rmse": val["rmse"],
                "val_mae": val["mae"],
                "val_masked_mae": val["masked_mae"],
                "step": self.step,
                "seconds": {"train": t1 - t0, "val": t2 - t1},
                "seconds_round": t2 - t0,
                "bytes": {},
                "failures": 0,
            }
            if rec["val_loss"] < es["best_loss"]:
                es.update(
                    best_loss=rec["val_loss"], best_round=epoch, bad_rounds=0, best=self._state()
                )
            else:
                es["bad_rounds"] += 1
            if self.writer:
                self.writer.log_round(rec)
                self.writer.save_checkpoint(
                    self._checkpoint(es, epoch, seconds_before + time.perf_counter() - t_start)
                )
            if epoch % int(self.cfg.log_every) == 0:
                self.progress(
                    f"epoch {epoch:3d}  train {train_loss:.4f}  val loss "
                    f"{rec['val_loss']:.4f}  val RMSE {rec['val_rmse']:.3f}  "
                    f"({rec['seconds_round']:.1f}s)"
                )
        return self.test(es, epoch, seconds_before + time.perf_counter() - t_start)

    def _restore(self, ckpt: dict[str, Any]) -> tuple[int, float, dict[str, Any]]:
        """Continue after ``ckpt['round']``: ``(last epoch, seconds so far, early stopping)``.

        Restores the model, its optimizer state and the step counter; window shuffles and
        scheduled-sampling coins are keyed by (seed, epoch, batch) (:mod:`cnfgnn.rng`), so
        the epochs after the restart are those of an uninterrupted run.
        """
        if "model" not in ckpt or "optimizer" not in ckpt:
            raise ValueError(
                f"{self.writer.checkpoint_path}: not a checkpoint of a centralised "
                "run that can be resumed (another method's, or an older version's). "
                "Fix: start a new run (resume=false) or pass that run's run_dir"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        epoch = int(ckpt["round"])
        kept = ckpt["early_stopping"]
        es = {
            "best_loss": kept["best_loss"],
            "best_round": kept["best_round"],
            "bad_rounds": kept["bad_rounds"],
            "best": ckpt["best_model"],
        }
        self.writer.truncate_rounds(epoch)
        self.progress(f"resumed after epoch {epoch}")
        return epoch, float(ckpt.get("seconds_total", 0.0)), es

    def _checkpoint(self, es: dict[str, Any], epoch: int, seconds: float) -> dict[str, Any]:
        """The same keys as the federated checkpoint where they apply (theta, server), plus
        what resuming needs (the whole model, its optimizer, the best epoch's weights)."""

        def split(state: dict[str, Tensor]) -> tuple[dict[str, np.ndarray], dict | None]:
            theta = {
                k[len("node.") :]: v[0].cpu().numpy()
                for k, v in state.items()
                if k.startswith("node.")
            }
            gn = {k[len("gn.") :]: v for k, v in state.items() if k.startswith("gn.")}
            return theta, ({"gn": gn} if gn else None)

        theta, server = split(self.model.state_dict())
        best_theta, best_server = split(es["best"])
        return {
            "round": epoch,
            "theta": theta,
            "server": server,
            "step": self.step,
            "early_stopping": {k: v for k, v in es.items() if k != "best"}
            | {"best_theta": best_theta, "best_server": best_server},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_model": es["best"],
            "seconds_total": seconds,
        }

    def test(self, es: dict[str, Any], epochs: int, seconds: float) -> dict[str, Any]:
        self.model.load_state_dict(es["best"])
        n = len(self.eval_nodes)
        s_test = len(self.eval.series.starts[P.TEST])
        chosen, windows = report_selection(self.cfg, n, s_test, self.data.interval_minutes)
        sums, forecast = self.evaluate(P.TEST, windows if len(chosen) else None)
        ids = list(self.data.sensor_ids)
        final: dict[str, Any] = {
            "test": metrics_from_sums(sums),
            "best_round": es["best_round"],
            "rounds_run": epochs,
            "best_val_loss": es["best_loss"],
            "test_per_horizon": per_horizon(sums),
        }
        per_node = np.sqrt(sums["sq"].sum(1) / np.maximum(sums["count"].sum(1), 1))
        final["test_rmse_per_node"] = dict(
            zip([ids[i] for i in self.eval_nodes], per_node.tolist())
        )
        if self.fed.inductive_ratio is not None:
            seen = np.isin(self.eval_nodes, self.train_nodes)
            final["test_seen"] = metrics_from_sums({k: v[seen] for k, v in sums.items()})
            final["test_unseen"] = metrics_from_sums({k: v[~seen] for k, v in sums.items()})
        if forecast is not None:
            first = int(self.eval.series.starts[P.TEST][0]) + int(self.cfg.dataset.in_steps)
            if self.writer:
                self.writer.write_predictions(
                    np.asarray([ids[i] for i in self.eval_nodes[chosen]]),
                    (first + windows).astype(np.int64),
                    forecast[:, :, chosen],
                )
            final["predictions"] = {
                "sensors": [ids[i] for i in self.eval_nodes[chosen]],
                "windows": int(len(windows)),
                "file": "predictions.npz",
            }
        # centralising means uploading every node's series once (float32 speed + mask bytes)
        raw = self.data.speed.shape[0] * len(self.train_nodes)
        final["bytes"] = {"upload_raw": {"up_tensor": 4 * raw, "up_other": raw}}
        final["bytes_total"] = 5 * raw
        final["parameters"] = {
            "node": self.model.node.num_parameters_per_node(),
            "server": self.model.server.num_parameters() if self.model.server else 0,
        }
        final["seconds_total"] = seconds
        final["failures"] = []
        final["nodes"] = {
            "total": len(self.eval_nodes),
            "train": len(self.train_nodes),
            "clients": 1,
        }
        if self.writer:
            self.writer.write_final(final)
        return final
