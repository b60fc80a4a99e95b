"""How close a round is to this CPU's limit: fp32 matmul throughput at the round's own shapes.

``cnfgnn-bench`` (engines mode) runs :func:`calibrate` before the cases, in a subprocess with
the cases' thread setting, and combines it with the FLOPs of the central round counted by
:class:`torch.utils.flop_counter.FlopCounterMode`:

* **per shape**: the sustained GFLOP/s of ``torch.baddbmm`` at the node GRU's hidden-to-gates
  matmuls (``[K, B, H] x [K, H, 3H]`` for ``K`` = all nodes, ``B`` = the local and the server
  batch, ``H`` = the encoder's hidden size and the decoder's) and of ``torch.addmm`` at the
  server GN's edge-MLP layers (``[E*M, W] x [W, W]`` and ``[E*M, W] x [W, latent]``, ``E``
  edges of the case's graph, ``M`` = server batch x GRU layers, ``W`` = ``model.gn.mlp_hidden``);
* **sustained** (:func:`sustained`): one figure for the round's matmul mix, the time-weighted
  (FLOP-weighted harmonic) mean of the shapes' rates with each op kind weighted by its share
  of the central round's counted FLOPs (``bmm``/``baddbmm`` for the node GRU, ``mm``/``addmm``
  for the GN);
* **per case** (:func:`case_limit`): achieved GFLOP/s = the central round's counted FLOPs /
  the case's round seconds, and ``flop_fraction`` = achieved / sustained. Every case does the
  same math, so the central round's count is each case's useful work; messaging, copies and
  element-wise kernels are what keeps the fraction below 1.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: Op kinds of the calibration: FlopCounterMode op names whose FLOPs each kind stands for.
OP_KINDS: dict[str, tuple[str, ...]] = {
    "bmm": ("aten.bmm", "aten.baddbmm", "aten.baddbmm_"),  # node GRU (backward: in place too)
    "mm": ("aten.mm", "aten.addmm", "aten.addmm_"),  # server GN's Linear layers
}
#: The calibrated torch op of each kind.
KIND_OP = {"bmm": "baddbmm", "mm": "addmm"}


@dataclass(frozen=True)
class MatmulShape:
    """One matmul of the round, as calibrated.

    Attributes:
        name: short label (JSON key).
        kind: ``bmm`` (``torch.baddbmm``) or ``mm`` (``torch.addmm``), a key of :data:`OP_KINDS`.
        dims: ``bmm``: ``(K, B, n_in, n_out)`` for ``[K, B, n_in] x [K, n_in, n_out]``;
            ``mm``: ``(rows, n_in, n_out)`` for ``[rows, n_in] x [n_in, n_out]``.
        what: where the round does it.
    """

    name: str
    kind: str
    dims: tuple[int, ...]
    what: str

    @property
    def flops(self) -> int:
        """FLOPs of one call (2 per multiply-add; the bias add is not counted, as
        FlopCounterMode does not count it)."""
        return 2 * math.prod(self.dims)


def round_shapes(cfg: Any, num_nodes: int, num_edges: int) -> list[MatmulShape]:
    """The matmul shapes of a CNFGNN round of ``cfg`` on a graph of ``num_nodes`` nodes
    and ``num_edges`` edges (non-zeros of the adjacency, as the GN uses them).

    Node GRU, for each batch (``federation.batch_size`` and the server batch,
    ``server_batch_size x server_batches_per_trip``) and each hidden size (encoder ``H``,
    decoder ``2H`` with graph embeddings): ``[K, B, H] x [K, H, 3H]``, ``K = num_nodes``.
    GN (with graph embeddings): the edge MLP's hidden and output layers on ``E x M`` rows.
    """
    m, fed = cfg.model, cfg.federation
    h = int(m.hidden_size)
    use_gn = bool(m.graph_embedding)
    server_batch = int(fed.server_batch_size) * int(fed.server_batches_per_trip)
    hiddens = [("encoder", h), ("decoder", 2 * h if use_gn else h)]
    out = []
    for b in sorted({int(fed.batch_size), server_batch}, reverse=True):
        for who, hh in hiddens:
            out.append(
                MatmulShape(
                    f"gru_{who}_b{b}",
                    "bmm",
                    (num_nodes, b, hh, 3 * hh),
                    f"node GRU {who} (hidden {hh}), batch {b}: [K, B, H] x [K, H, 3H]",
                )
            )
    if use_gn:
        rows = num_edges * server_batch * int(m.num_layers)
        w, latent = int(m.gn.mlp_hidden), int(m.gn.latent_size)
        out += [
            MatmulShape(
                "gn_edge_hidden",
                "mm",
                (rows, w, w),
                f"GN edge MLP hidden layer, E={num_edges} x M={rows // num_edges}: "
                "[E*M, W] x [W, W]",
            ),
            MatmulShape(
                "gn_edge_out",
                "mm",
                (rows, w, latent),
                "GN edge MLP output layer: [E*M, W] x [W, latent]",
            ),
        ]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(shape: MatmulShape, device: torch.device, seed: int) -> Callable[[], Any]:
    """A closure doing one matmul of ``shape`` into a preallocated output, with the
    weight laid out as the model holds it (transposed view, as ``F.linear`` and the GRU do)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(device)

    if shape.kind == "bmm":
        k, b, n_in, n_out = shape.dims
        a, w, bias = rand(k, b, n_in), rand(k, n_out, n_in), rand(k, 1, n_out)
        wt, out = w.transpose(1, 2), torch.empty(k, b, n_out, device=device)
        return lambda: torch.baddbmm(bias, a, wt, out=out)
    rows, n_in, n_out = shape.dims
    a, w, bias = rand(rows, n_in), rand(n_out, n_in), rand(n_out)
    wt, out = w.t(), torch.empty(rows, n_out, device=device)
    return lambda: torch.addmm(bias, a, wt, out=out)


def measure(
    shape: MatmulShape,
    device: torch.device,
    seconds: float,
    blocks: int,
    warmup: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Sustained GFLOP/s of one shape: ``warmup`` untimed calls, then ``blocks`` timed
    blocks of equal call counts lasting about ``seconds`` in all.

    Returns:
        ``op``, ``dims``, ``what``, ``flops_per_call``, ``calls`` (timed), ``seconds``
        (timed), ``gflops`` (the median block's rate: robust to a loaded machine) and
        ``gflops_best`` (the fastest block's).
    """
    call = _call(shape, device, seed)
    for _ in range(max(warmup, 1)):
        call()
    _sync(device)
    t0 = time.perf_counter()
    call()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-9)
    per_block = max(1, round(seconds / max(blocks, 1) / one))
    rates, total = [], 0.0
    for _ in range(max(blocks, 1)):
        t0 = time.perf_counter()
        for _ in range(per_block):
            call()
        _sync(device)
        dt = max(time.perf_counter() - t0, 1e-9)
        total += dt
        rates.append(shape.flops * per_block / dt)
    return {
        "op": KIND_OP[shape.kind],
        "dims": list(shape.dims),
        "what": shape.what,
        "flops_per_call": shape.flops,
        "calls": per_block * max(blocks, 1),
        "seconds": total,
        "gflops": statistics.median(rates) / 1e9,
        "gflops_best": max(rates) / 1e9,
    }


def calibrate(
    cfg: Any,
    num_nodes: int,
    num_edges: int,
    settings: Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Measure every shape of :func:`round_shapes` at the current torch thread setting.

    Args:
        cfg: the case config (``model``, ``federation``, ``seed``) whose round is calibrated;
            its ``threads`` must already be applied (:func:`cnfgnn.machine.apply`).
        num_nodes: ``K`` of the node GRU (all nodes).
        num_edges: ``E`` of the GN (non-zeros of the case's adjacency).
        settings: ``bench.calibration`` (``seconds_per_shape``, ``blocks``, ``warmup``).
        device: where to measure.

    Returns:
        ``threads`` (torch's intra-op threads during the measurement), ``device``, ``nodes``,
        ``edges``, ``shapes`` (name -> :func:`measure` record) and ``seconds`` (wall, all
        shapes).
    """
    dev = torch.device(device)
    t0 = time.perf_counter()
    shapes = {
        s.name: measure(
            s,
            dev,
            float(settings["seconds_per_shape"]),
            int(settings["blocks"]),
            int(settings["warmup"]),
            seed=int(cfg.seed) + i,
        )
        for i, s in enumerate(round_shapes(cfg, num_nodes, num_edges))
    }
    return {
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "nodes": num_nodes,
        "edges": num_edges,
        "shapes": shapes,
        "seconds": time.perf_counter() - t0,
    }


def sustained(shapes: Mapping[str, Any], flops_by_op: Mapping[str, float]) -> dict[str, Any]:
    """The round's sustained matmul throughput from per-shape rates and FLOPs by op.

    Each kind's rate is the harmonic mean of its shapes' rates (its FLOPs split equally among
    its calibrated shapes); the kinds combine by their share of the counted FLOPs:
    ``sustained = covered FLOPs / sum_kind(FLOPs_kind / rate_kind)``, i.e. the rate at which
    the round's counted matmuls would run back to back at the calibrated speeds.

    Args:
        shapes: name -> a :func:`measure` record (``op``, ``gflops``).
        flops_by_op: FlopCounterMode's counts of the round, op name (``aten.bmm``) -> FLOPs.

    Returns:
        ``gflops`` (None when no counted FLOP is of a calibrated kind), ``kind_gflops``,
        ``kind_shares`` (share of the counted FLOPs per kind) and ``uncovered_share`` (FLOPs
        of ops no calibrated kind stands for; left out of the figure).
    """
    total = float(sum(flops_by_op.values()))
    rates: dict[str, list[float]] = {}
    for rec in shapes.values():
        kind = next(k for k, op in KIND_OP.items() if op == rec["op"])
        rates.setdefault(kind, []).append(float(rec["gflops"]))
    kind_rate = {k: len(v) / sum(1.0 / max(r, 1e-12) for r in v) for k, v in rates.items()}
    kind_flops = {
        k: float(sum(flops_by_op.get(op, 0.0) for op in ops)) for k, ops in OP_KINDS.items()
    }
    covered = {k: f for k, f in kind_flops.items() if f > 0 and k in kind_rate}
    seconds = sum(f / (kind_rate[k] * 1e9) for k, f in covered.items())
    return {
        "gflops": sum(covered.values()) / seconds / 1e9 if seconds > 0 else None,
        "kind_gflops": kind_rate,
        "kind_shares": {k: f / total if total else 0.0 for k, f in kind_flops.items()},
        "uncovered_share": (total - sum(covered.values())) / total if total else 0.0,
    }


def case_limit(
    round_seconds: float | None, central_flops: float | None, sustained_gflops: float | None
) -> dict[str, float | None]:
    """A case against the limit: ``achieved_gflops`` (the central round's counted FLOPs per
    second of this case's round) and ``flop_fraction`` (achieved / sustained)."""
    if not round_seconds or not central_flops:
        return {"achieved_gflops": None, "flop_fraction": None}
    achieved = central_flops / round_seconds / 1e9
    return {
        "achieved_gflops": achieved,
        "flop_fraction": achieved / sustained_gflops if sustained_gflops else None,
    }
