"""cnfgnn-bench's CPU-limit figures, the per-message overhead and the Los-loop preset."""

from __future__ import annotations

import pytest
import torch

from cnfgnn.bench import engines as bench
from cnfgnn.bench.calibrate import OP_KINDS, calibrate, case_limit, round_shapes, sustained
from cnfgnn.bench.overhead import measure_message_overhead
from cnfgnn.data.loaders import load_dataset, loader_kwargs
from cnfgnn.federation import protocol as P
from tests.helpers import TINY

#: Calibration short enough for a test (the defaults take a few seconds).
QUICK = ("bench.calibration.seconds_per_shape=0.02", "bench.calibration.blocks=2")


@pytest.fixture
def tiny_bench(tmp_path):
    """The bench composed on the tiny synthetic config."""
    return bench.compose_bench([*TINY, f"output_root={tmp_path}", *QUICK])


def test_round_shapes_follow_the_config(tiny_bench):
    cfg = tiny_bench
    h, b, sb = cfg.model.hidden_size, cfg.federation.batch_size, cfg.federation.server_batch_size
    shapes = {s.name: s for s in round_shapes(cfg, num_nodes=6, num_edges=10)}
    assert shapes[f"gru_encoder_b{b}"].dims == (6, b, h, 3 * h)
    assert shapes[f"gru_decoder_b{sb}"].dims == (6, sb, 2 * h, 6 * h)  # decoder: [h_c ; h_G]
    w, latent = int(cfg.model.gn.mlp_hidden), int(cfg.model.gn.latent_size)
    assert shapes["gn_edge_hidden"].dims == (10 * sb, w, w)  # E x M rows
    assert shapes["gn_edge_out"].dims == (10 * sb, w, latent)
    assert shapes["gn_edge_out"].flops == 2 * 10 * sb * w * latent


def test_calibration_gives_every_shape_and_a_sustained_figure(tiny_bench):
    torch.set_num_threads(1)
    rec = calibrate(tiny_bench, 6, 10, tiny_bench.bench.calibration)
    assert rec["threads"] == 1 and len(rec["shapes"]) == 6
    for name, s in rec["shapes"].items():
        assert s["gflops"] > 0 and s["gflops_best"] >= s["gflops"] and s["calls"] >= 2, name
    # one FLOP of each kind: the sustained figure is the harmonic mean of the two kinds
    by_op = {"aten.bmm": 1.0, "aten.addmm": 1.0}
    sus = sustained(rec["shapes"], by_op)
    kg = sus["kind_gflops"]
    assert sus["gflops"] == pytest.approx(2 / (1 / kg["bmm"] + 1 / kg["mm"]))
    assert sus["kind_shares"] == {"bmm": 0.5, "mm": 0.5} and sus["uncovered_share"] == 0
    # FLOPs of an op no calibrated kind covers are left out and reported
    sus = sustained(rec["shapes"], by_op | {"aten.convolution": 2.0})
    assert sus["uncovered_share"] == 0.5 and sus["gflops"] > 0
    assert set(OP_KINDS) == set(kg)


def test_case_limit():
    assert case_limit(2.0, 4e9, 4.0) == {"achieved_gflops": 2.0, "flop_fraction": 0.5}
    assert case_limit(None, 4e9, 4.0)["flop_fraction"] is None
    assert case_limit(2.0, 4e9, None) == {"achieved_gflops": 2.0, "flop_fraction": None}


def test_in_place_matmuls_count_as_their_out_of_place_forms():
    """FlopCounterMode alone counts nothing for ``baddbmm_``/``addmm_`` (the GRU backward's
    input and weight gradients); the bench's counter counts what their other forms count."""
    from torch.utils.flop_counter import FlopCounterMode

    a, b, c = torch.randn(3, 4, 5), torch.randn(3, 5, 6), torch.zeros(3, 4, 6)
    with FlopCounterMode(display=False) as plain:
        c.clone().baddbmm_(a, b)
        c[0].clone().addmm_(a[0], b[0])
    assert plain.get_total_flops() == 0
    with FlopCounterMode(display=False) as out_of_place:
        torch.baddbmm(c, a, b)
        torch.addmm(c[0], a[0], b[0])
    with bench.flop_counter() as counter:
        c.clone().baddbmm_(a, b)
        c[0].clone().addmm_(a[0], b[0])
    assert counter.get_total_flops() == out_of_place.get_total_flops() == 2 * 4 * 5 * 6 * 4


def test_flop_fraction_of_a_tiny_central_round(tiny_bench, tmp_path):
    """The bench's count of one central round, the calibration at the case's threads, and
    the fraction of the limit the measured round reached."""
    case = {"name": "central", "engine": "central"}
    ccfg = bench.case_config(tiny_bench, case)
    rec = bench.summarise(bench.run_case(ccfg, case, tmp_path / "central", count_flops=True))
    rec["threads"] = bench.thread_setting(ccfg)
    count = rec["count"]
    assert count["flops"] == pytest.approx(sum(count["flops_by_op"].values()))
    assert {"aten.baddbmm", "aten.baddbmm_", "aten.addmm"} <= set(count["flops_by_op"])
    torch.set_num_threads(rec["threads"])
    cal = calibrate(ccfg, rec["nodes"], 10, tiny_bench.bench.calibration) | {"status": "ok"}
    limit = bench.cpu_limit({"central": rec}, {str(rec["threads"]): cal})
    assert limit is not None
    figures = limit["cases"]["central"]
    assert 0 < figures["flop_fraction"] <= 1.5
    assert figures["achieved_gflops"] == pytest.approx(
        count["flops"] / rec["per_round"]["seconds"] / 1e9
    )
    assert sum(limit["flop_shares_by_op"].values()) == pytest.approx(1.0)


def test_message_overhead_per_type(tiny_bench):
    ccfg = bench.case_config(
        tiny_bench, {"name": "m", "engine": "inprocess", "nodes_per_client": 1}
    )
    settings = {"clients": 2, "repeats": 3, "warmup": 1, "split_batch": 1, "goal_s": 0.002}
    out = measure_message_overhead(ccfg, load_dataset(ccfg.dataset), "cpu", settings)
    assert out["clients"] == 2 and out["split_batch"] == 1 and out["empty_send_s"] > 0
    types = out["types"]
    assert {r["message_type"] for r in types.values()} == {
        P.SPLIT_STEP,
        P.EMBED,
        P.ENCODE,
        P.EVALUATE,
    }
    for name, r in types.items():
        assert r["overhead_s"]["p90"] >= r["overhead_s"]["median"] > 0, name
        assert r["handler_s"]["median"] > 0 and r["parts_s"]["check_request"] > 0, name
        assert isinstance(r["met"], bool)
    assert types["split_step"]["parts_s"]["rng"] > 0  # the handler's scheduled-sampling coins


def test_los_loop_preset_composes():
    """``cnfgnn-bench bench=los_loop``: the real data, the paper's METR-LA settings, four
    cases; config only (no round is run)."""
    cfg = bench.compose_bench(["bench=los_loop"])
    ds = cfg.dataset
    assert ds.kind == "los_loop" and ds.graph == "metr_la"
    assert "num_nodes" not in ds and "days" not in ds  # the synthetic preset's keys stay out
    loader_kwargs(ds)  # the loader accepts every key
    fed = cfg.federation
    assert (cfg.model.hidden_size, fed.batch_size, fed.server_batch_size) == (64, 128, 48)
    assert (fed.local_epochs, fed.server_epochs) == (1, 1)
    assert [c.name for c in cfg.bench.engines] == [
        "central",
        "inprocess_all",
        "inprocess_per_sensor",
        "inprocess_per_sensor_unfused",
    ]
    assert cfg.bench.calibration.enabled and cfg.bench.message_overhead.enabled
    per_sensor = bench.case_config(cfg, dict(cfg.bench.engines[2]))
    assert per_sensor.federation.nodes_per_client == 1 and "bench" not in per_sensor
    assert per_sensor.engine.fuse_clients is True
    unfused = bench.case_config(cfg, dict(cfg.bench.engines[3]))  # the case's own `set`
    assert unfused.engine.fuse_clients is False and unfused.federation.nodes_per_client == 1
    # the default preset keeps its synthetic network
    default = bench.compose_bench([])
    assert (default.dataset.kind, default.dataset.num_nodes) == ("synthetic", 207)
