"""GraphServer: chunked split-learning steps equal the whole-batch step; fused Adam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from cnfgnn.federation.server import GraphServer
from cnfgnn.optim import make_adam
from tests.helpers import make_cfg


def _servers(chunk: int) -> tuple[GraphServer, GraphServer]:
    cfg = make_cfg("model.hidden_size=8", "model.gn.mlp_hidden=16", "model.gn.latent_size=8")
    torch.manual_seed(0)
    whole = GraphServer(cfg.model, lr=1e-2)
    with open_dict(cfg):
        cfg.model.gn.grad_chunk = chunk
    chunked = GraphServer(cfg.model, lr=1e-2)
    chunked.gn.load_state_dict(whole.gn.state_dict())
    return whole, chunked


def test_chunked_step_equals_whole_batch_step():
    whole, chunked = _servers(chunk=3)
    rng = np.random.default_rng(0)
    adj = (rng.random((7, 7)) < 0.4) * rng.random((7, 7))
    graph = whole.graph(adj)
    for _ in range(2):  # two steps: Adam state follows too
        h_c = rng.standard_normal((10, 7, 1, 8)).astype(np.float32)
        grad = rng.standard_normal((10, 7, 1, 8)).astype(np.float32)
        a, b = whole.forward(h_c, graph), chunked.forward(h_c, graph)
        assert b.grad_fn is None  # chunked: no graph kept between forward and step
        torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=1e-5)
        whole.step(a, grad)
        chunked.step(b, grad)
    for (name, p), q in zip(whole.gn.named_parameters(), chunked.gn.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_chunk_needs_no_dropout():
    cfg = make_cfg("model.gn.dropout=0.1", "model.gn.grad_chunk=4")
    with pytest.raises(ValueError, match="grad_chunk"):
        GraphServer(cfg.model, lr=1e-3)


def test_make_adam_matches_default_adam():
    torch.manual_seed(1)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    fused, plain = make_adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    assert fused.defaults["fused"]
    x = torch.randn(16, 5)
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
