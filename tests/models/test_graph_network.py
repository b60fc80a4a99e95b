"""GraphNetwork: size, equivalence with PyG MetaLayer, equivariance, batching, direction,
gradients."""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn
from torch_geometric.nn import MetaLayer
from torch_geometric.utils import scatter

from cnfgnn.models.graph_network import GNBlock, GraphNetwork

SMALL = dict(
    node_size=6,
    edge_size=1,
    global_size=5,
    mlp_hidden=16,
    latent_size=7,
    num_blocks=2,
    output_size=4,
)


def small_gn(seed: int = 0, **kw) -> GraphNetwork:
    torch.manual_seed(seed)
    return GraphNetwork(**{**SMALL, **kw}).double()


def random_graph(n: int, e: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    return edge_index, torch.rand(e, generator=g, dtype=torch.float64)


class _Edge(nn.Module):
    def __init__(self, block: GNBlock):
        super().__init__()
        self.block = block

    def forward(self, src, dst, edge_attr, u, batch):
        return self.block.edge_mlp(torch.cat([src, dst, edge_attr, u[batch]], dim=-1))


class _Node(_Edge):
    def forward(self, x, edge_index, edge_attr, u, batch):
        agg = scatter(edge_attr, edge_index[1], dim=0, dim_size=x.shape[0], reduce="sum")
        return self.block.node_mlp(torch.cat([x, agg, u[batch]], dim=-1))


class _Global(_Edge):
    def forward(self, x, edge_index, edge_attr, u, batch):
        xs = scatter(x, batch, dim=0, dim_size=u.shape[0], reduce="sum")
        es = scatter(edge_attr, batch[edge_index[0]], dim=0, dim_size=u.shape[0], reduce="sum")
        return self.block.global_mlp(torch.cat([xs, es, u], dim=-1))


def metalayer_reference(gn: GraphNetwork, h: Tensor, edge_index: Tensor, w: Tensor) -> Tensor:
    """The notes' §3.2 recipe, written plainly: PyG MetaLayer on the disjoint union graph."""
    b, n, layers, f = h.shape
    m, e = b * layers, edge_index.shape[1]
    x = h.transpose(1, 2).reshape(m * n, f)  # graph g = b * L + l holds rows g * N ... g * N + N-1
    ei = edge_index.repeat(1, m) + (torch.arange(m) * n).repeat_interleave(e)
    ea = w.reshape(e, -1).repeat(m, 1)
    batch = torch.arange(m).repeat_interleave(n)
    u = h.new_zeros(m, gn.global_size)
    for blk in gn.blocks:
        x1, e1, u1 = MetaLayer(_Edge(blk), _Node(blk), _Global(blk))(x, ei, ea, u, batch)
        x, ea, u = torch.cat([x1, x], -1), torch.cat([e1, ea], -1), torch.cat([u1, u], -1)
    return gn.output(x).view(b, layers, n, -1).transpose(1, 2)


def test_parameter_count_default():
    gn = GraphNetwork()
    assert sum(p.numel() for p in gn.parameters()) == 1_237_312
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    b1, b2 = gn.blocks
    assert [count(b1.edge_mlp), count(b1.node_mlp), count(b1.global_mlp)] == [
        148_352,
        164_480,
        180_864,
    ]
    assert [count(b2.edge_mlp), count(b2.node_mlp), count(b2.global_mlp)] == [
        279_424,
        230_016,
        213_632,
    ]
    assert count(gn.output) == 20_544


def test_shape_and_edge_weight_forms():
    gn = small_gn()
    edge_index, w = random_graph(9, 25)
    h = torch.randn(3, 9, 2, 6, dtype=torch.float64)
    out = gn(h, edge_index, w)
    assert out.shape == (3, 9, 2, 4)
    torch.testing.assert_close(gn(h, edge_index, w[:, None]), out, atol=0, rtol=0)


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_matches_metalayer_reference(num_blocks):
    gn = small_gn(num_blocks=num_blocks)
    edge_index, w = random_graph(8, 30, seed=1)
    h = torch.randn(3, 8, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(
        gn(h, edge_index, w), metalayer_reference(gn, h, edge_index, w), atol=1e-10, rtol=1e-10
    )


def test_gradients_match_metalayer_reference():
    """The last block sums the edge MLP's hidden layer before its output Linear: every
    parameter's gradient (that Linear's included) equals the plain per-edge recipe's."""
    gn = small_gn(seed=5)
    edge_index, w = random_graph(7, 25, seed=7)
    edge_index[1, 0] = 6  # node 6 may have no in-edges otherwise: keep both cases
    h = torch.randn(3, 7, 1, 6, dtype=torch.float64)
    target = torch.randn(3, 7, 1, 4, dtype=torch.float64)
    ours = torch.autograd.grad(
        (gn(h, edge_index, w) * target).sum(), list(gn.parameters()), allow_unused=True
    )
    ref = torch.autograd.grad(
        (metalayer_reference(gn, h, edge_index, w) * target).sum(),
        list(gn.parameters()),
        allow_unused=True,
    )
    for (name, _), a, b in zip(gn.named_parameters(), ours, ref, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_permutation_equivariance():
    gn = small_gn(seed=1)
    n = 7
    edge_index, w = random_graph(n, 20, seed=2)
    h = torch.randn(2, n, 1, 6, dtype=torch.float64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))  # new j holds old perm[j]
    inv = torch.argsort(perm)
    eperm = torch.randperm(20, generator=torch.Generator().manual_seed(4))  # edge order too
    out = gn(h, edge_index, w)
    out_p = gn(h[:, perm], inv[edge_index][:, eperm], w[eperm])
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-10, rtol=1e-10)


def test_batching_equivalence():
    gn = small_gn(seed=2)
    edge_index, w = random_graph(6, 15, seed=5)
    h = torch.randn(5, 6, 2, 6, dtype=torch.float64)
    out = gn(h, edge_index, w)
    for b in range(5):
        torch.testing.assert_close(
            out[b : b + 1], gn(h[b : b + 1], edge_index, w), atol=1e-12, rtol=0
        )
        for layer in range(2):  # GRU layers are independent graphs too
            alone = gn(h[b : b + 1, :, layer : layer + 1], edge_index, w)
            torch.testing.assert_close(
                out[b : b + 1, :, layer : layer + 1], alone, atol=1e-12, rtol=0
            )


def test_window_chunk_gives_the_same_values_and_gradients():
    """Runs of 2 windows (2 + 2 + 1) against the whole batch at once: same h_G, same
    parameter and input gradients; a chunk of 0 is refused."""
    edge_index, w = random_graph(6, 15, seed=8)
    h = torch.randn(5, 6, 2, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 6, 2, 4, dtype=torch.float64)
    results = []
    for chunk in (None, 2):
        gn = small_gn(seed=6, window_chunk=chunk)
        out = gn(h, edge_index, w)
        grads = torch.autograd.grad((out * target).sum(), [h, *gn.parameters()], allow_unused=True)
        results.append((out, grads))
    (whole, g_whole), (runs, g_runs) = results
    torch.testing.assert_close(runs, whole, atol=1e-12, rtol=0)
    for a, b in zip(g_whole, g_runs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="window_chunk"):
        small_gn(window_chunk=0)


def dependency(gn: GraphNetwork, h: Tensor, edge_index: Tensor, w: Tensor) -> Tensor:
    """dep[j, i] = True iff output node j has a nonzero derivative w.r.t. input node i."""
    h = h.clone().requires_grad_(True)
    out = gn(h, edge_index, w)
    n = h.shape[1]
    dep = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        (g,) = torch.autograd.grad(out[:, j].sum(), h, retain_graph=True)
        dep[j] = g.abs().sum(dim=(0, 2, 3)) > 0
    return dep


def test_message_direction_and_hops():
    """Directed path 0->1->2->3->4. Along edges, two blocks carry information at most two hops
    (from source to target only); the global state is the only other route. With the
    u-inputs of blocks >= 2 cut, out_j depends on x_i exactly when 0 <= j - i <= 2; with them,
    on every node. Swapped source/target, extra hops or a leaking global would break this."""
    n = 5
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    w = torch.rand(4, dtype=torch.float64) + 0.5
    h = torch.randn(4, n, 1, 6, dtype=torch.float64)
    gn = small_gn(seed=3)
    assert dependency(gn, h, edge_index, w).all()  # the global route reaches everyone

    with torch.no_grad():
        for blk in gn.blocks[1:]:
            gsize = blk.sizes[-1]
            blk.edge_mlp[0].weight[:, -gsize:] = 0  # edge MLP input [x_src, x_dst, e, u]
            blk.node_mlp[0].weight[:, -gsize:] = 0  # node MLP input [x, agg, u]
    i = torch.arange(n)
    hops = i[:, None] - i[None, :]  # j - i
    expected = (hops >= 0) & (hops <= 2)
    assert torch.equal(dependency(gn, h, edge_index, w), expected)


def test_gradient_flow():
    gn = small_gn(seed=4)
    edge_index, w = random_graph(6, 18, seed=6)
    h = torch.randn(3, 6, 1, 6, dtype=torch.float64)
    gn(h, edge_index, w).square().sum().backward()
    dead = f"blocks.{gn.num_blocks - 1}.global_mlp."
    for name, p in gn.named_parameters():
        if name.startswith(dead):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # block-1 first-layer columns that multiply the zero initial global state: zero gradient
    blk = gn.blocks[0]
    gsize = gn.global_size
    for mlp in (blk.edge_mlp, blk.node_mlp, blk.global_mlp):
        assert mlp[0].weight.grad[:, -gsize:].abs().max() == 0
        assert mlp[0].weight.grad[:, :-gsize].abs().max() > 0


@pytest.mark.slow
def test_timing_metr_la_server_batch():
    """Prints forward + backward time at the METR-LA server batch (B=48, N=207, E=1722)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        gn = GraphNetwork()
        edge_index = torch.randint(0, 207, (2, 1722))
        w = torch.rand(1722)
        h = torch.randn(48, 207, 1, 64)
        gn(h, edge_index, w).sum().backward()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            gn(h, edge_index, w).square().mean().backward()
            times.append(time.perf_counter() - t0)
        times.sort()
        print(
            f"\nGraphNetwork fwd+bwd B=48 N=207 E=1722, 2 threads: median "
            f"{times[2] * 1e3:.0f} ms, min {times[0] * 1e3:.0f} ms"
        )
    finally:
        torch.set_num_threads(threads)
