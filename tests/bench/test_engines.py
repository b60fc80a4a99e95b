"""cnfgnn-bench: one small run of the central limit and the in-process engine, side by side."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from cnfgnn.bench import engines as bench
from tests.helpers import TINY

CASES = (
    "bench.engines=[{name:central,engine:central},"
    "{name:inprocess_all,engine:inprocess,nodes_per_client:null},"
    "{name:inprocess_per_sensor,engine:inprocess,nodes_per_client:1,processes:2}]"
)


def test_bench_measures_engines_on_the_same_math(tmp_path, capsys):
    overrides = [o for o in TINY if not o.startswith("federation.rounds")] + [
        f"output_root={tmp_path}",
        CASES,
        "bench.count_flops=true",
        "bench.rounds=1",
        "bench.repeats=2",  # every case twice: the median record, per-repeat ratios
        "bench.calibration.seconds_per_shape=0.02",
        "bench.message_overhead.clients=2",
        "bench.message_overhead.repeats=2",
        "bench.settle.load=1000",  # the settling step runs, but a busy test machine never waits
    ]
    bench.main(overrides)
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    written = list(tmp_path.glob("bench/*_engines/bench.json"))
    assert len(written) == 1 and json.loads(written[0].read_text()) == doc
    cases = doc["cases"]
    assert set(cases) == {"central", "inprocess_all", "inprocess_per_sensor"}
    for name, rec in cases.items():
        assert rec["status"] == "ok", (name, rec.get("error"))
        pr = rec["per_round"]
        assert pr["seconds"] > 0 and rec["peak_rss_mb_tree"] > 50
        assert {"local", "encode", "split", "embed", "val"} <= set(pr["seconds_by_phase"])
    # the same round math: losses agree across the central limit and both groupings
    for name, diff in doc["loss_relative_difference_to_central"].items():
        assert all(v is not None and v < 1e-4 for v in diff.values()), (name, diff)
    # round trips: local, encode, ceil(S/48) split steps, embed, val encode + evaluate
    s = cases["central"]["windows"]["train"]
    steps = -(-s // 48)
    for name in ("inprocess_all", "inprocess_per_sensor"):
        assert cases[name]["per_round"]["round_trips"] == steps + 5
    assert cases["inprocess_per_sensor"]["per_round"]["messages"] == 6 * (steps + 5)
    # the per-sensor case's clients ran in two forked processes, the others in one
    assert cases["inprocess_per_sensor"]["client_processes"] == 2
    assert cases["inprocess_all"]["client_processes"] == 1
    assert cases["central"]["per_round"]["round_trips"] == 0
    assert doc["ratios"]["inprocess_all/central"] > 0
    spread = doc["ratios_repeats"]["inprocess_all/central"]
    assert doc["repeats"] == 2 and len(spread["values"]) == 2 and spread["std"] >= 0
    assert doc["ratios"]["inprocess_all/central"] == spread["median"]
    for name, rec in cases.items():
        seconds = rec["repeats"]["seconds_per_round"]
        assert len(seconds) == 2 and rec["repeats"]["status"] == ["ok", "ok"], name
        assert all(len(load) == 3 for load in rec["repeats"]["load_avg_before"]), name
        assert rec["per_round"]["seconds"] == min(seconds), name  # the lower middle of two
    assert len(list(written[0].parent.glob("repeat*/central.log"))) == 2
    # every goal of conf/bench/base.yaml this run measured, with its figure and verdict
    goals = doc["goals"]
    assert goals["inprocess_all/central"]["at_most"] == 1.5
    assert goals["inprocess_all/central"]["value"] == doc["ratios"]["inprocess_all/central"]
    assert goals["inprocess_per_sensor/inprocess_all"]["at_most"] == 1.3
    assert "flower_8/inprocess_8" not in goals  # no Flower case in this run
    assert goals["inprocess_all flop_fraction"]["at_least"] == 0.6
    assert goals["message overhead s"]["value"] > 0
    for label, g in goals.items():  # the steal of the goal's cases, where /proc/stat has it
        assert g["steal_max"] is None or 0.0 <= g["steal_max"] <= 1.0, label
    assert spread["cases"] == ["inprocess_all", "central"]
    for label, g in goals.items():
        assert isinstance(g["met"], bool), label
    assert "goal inprocess_all/central: " in captured.err  # the summary after the JSON
    for name, rec in cases.items():
        assert rec["settle_wait_s"] < 5 and len(rec["load_avg_before"]) == 3, name
    proj = doc["projection"]
    assert proj["cases"]["central"]["round_seconds"] > cases["central"]["per_round"]["seconds"]
    assert proj["gpu"]["round_seconds"] > 0 and proj["central_flops_per_round"] > 0
    assert doc["machine"]["cores"] >= 1 and doc["device"] == "cpu"
    # against the calibrated matmul limit (threads=1 for every case), and the message overhead
    limit = doc["cpu_limit"]
    assert limit["calibrations"]["1"]["sustained"]["gflops"] > 0
    cal = limit["calibrations"]["1"]  # calibrated before each repeat, each shape's fastest
    assert [r["status"] for r in cal["runs"]] == ["ok", "ok"]
    for name, shape in cal["shapes"].items():
        assert len(shape["gflops_runs"]) == 2 and shape["gflops"] == max(shape["gflops_runs"]), name
    assert len(list(written[0].parent.glob("repeat2/calibration_threads1*"))) >= 1
    for name in cases:
        assert 0 < limit["cases"][name]["flop_fraction"] <= 1.5, name
    assert doc["message_overhead"]["status"] == "ok"
    assert doc["message_overhead"]["types"]["split_step"]["overhead_s"]["median"] is not None


def test_calibrations_merge_to_each_shapes_fastest():
    """``merge_calibrations``: per thread setting, each shape at its fastest calibration;
    a failed calibration is listed but not used; one calibration stays as it was."""

    def cal(rates, status="ok"):
        shapes = {n: {"op": "addmm", "gflops": g, "calls": 1} for n, g in rates.items()}
        return {"status": status, "seconds": 1.0, "threads": 2, "shapes": shapes}

    runs = [
        {"2": cal({"a": 100.0, "b": 50.0})},
        {"2": cal({"a": 80.0, "b": 70.0}), "1": cal({"a": 40.0})},
        {"2": {"status": "timeout", "seconds": 9.0}},
    ]
    merged = bench.merge_calibrations(runs)
    assert set(merged) == {"2", "1"}
    two = merged["2"]
    assert {n: s["gflops"] for n, s in two["shapes"].items()} == {"a": 100.0, "b": 70.0}
    assert two["shapes"]["b"]["gflops_runs"] == [50.0, 70.0]
    assert [r["status"] for r in two["runs"]] == ["ok", "ok", "timeout"]
    assert merged["1"]["shapes"]["a"]["gflops"] == 40.0 and len(merged["1"]["runs"]) == 1
    assert bench.merge_calibrations([{"2": {"status": "timeout"}}])["2"]["status"] == "timeout"
    assert bench.merge_calibrations([]) == {}


def test_goals_are_met_missed_or_not_measured():
    """``evaluate_goals``: each kind of goal against its bound, and a failed case's figure."""
    spec = {
        "ratio_at_most": {"a/b": 1.2, "c/d": 2.0, "absent/b": 1.0},
        "flop_fraction_at_least": {"a": 0.6, "b": 0.6},
        "round_seconds_at_most": {"a": 71},
        "peak_memory_gb_at_most": {"a": 4.0},
    }
    cases = {
        "a": {
            "per_round": {"seconds": 70.0},
            "peak_rss_mb_tree": 5 * 1024.0,
            "repeats": {"cpu_steal_fraction": [0.01, None, 0.31]},
        },
        "b": {"status": "failed", "repeats": {"cpu_steal_fraction": [0.02]}},
    }
    limits = {"cases": {"a": {"flop_fraction": 0.5}, "b": {"flop_fraction": None}}}
    overhead = {"status": "ok", "goal_s": 0.002, "types": {"x": {"overhead_s": {"median": 1e-3}}}}
    ratios = {
        "a/b": {"median": 1.25, "std": 0.05, "cases": ["a", "b"]},
        "c/d": {"median": 1.9, "std": None, "cases": ["c", "d"]},
    }
    goals = bench.evaluate_goals(OmegaConf.create(spec), ratios, cases, limits, overhead)
    assert goals["a/b"] == {
        "value": 1.25,
        "at_most": 1.2,
        "met": False,
        "std": 0.05,
        "steal_max": 0.31,  # the worst repeat of either case
    }
    assert goals["c/d"]["met"] is True and "absent/b" not in goals
    assert goals["c/d"]["steal_max"] is None  # no steal recorded
    assert goals["a flop_fraction"] == {
        "value": 0.5,
        "at_least": 0.6,
        "met": False,
        "steal_max": 0.31,
    }
    assert goals["b flop_fraction"]["steal_max"] == 0.02
    assert goals["b flop_fraction"]["met"] is None  # the case failed: not measured
    assert goals["a seconds per round"]["met"] is True
    assert goals["a peak memory GB"]["value"] == 5.0 and goals["a peak memory GB"]["met"] is False
    assert goals["message overhead s"]["met"] is True
    lines = bench.goals_summary(goals, steal_label=0.05)
    assert (
        "a/b: 1.25 ± 0.05 (at most 1.2): MISSED [measured under steal: up to 31% in a repeat]"
        in lines
    )
    assert "c/d: 1.9 (at most 2): met" in lines
    assert "b flop_fraction: n/a (at least 0.6): not measured" in lines  # 2% < 5%: no label


def test_repeats_keep_the_median_run_and_pair_the_ratios():
    """``combine_repeats`` keeps each case's median repeat (and the central FLOP count of the
    first); ``paired_ratio`` divides within a repeat, skips a repeat whose case failed, and
    its median is not moved by one disturbed repeat of three."""

    def rec(seconds, **extra):
        return {"status": "ok", "per_round": {"seconds": seconds}, **extra}

    runs = [
        {"central": rec(10.0, count={"flops": 5}), "a": rec(12.0)},
        {"central": rec(14.0), "a": rec(21.0)},
        {"central": rec(12.0), "a": {"status": "failed"}},
    ]
    cases = bench.combine_repeats(runs)
    assert cases["central"]["per_round"]["seconds"] == 12.0  # the median of 10, 14, 12
    assert cases["central"]["count"] == {"flops": 5}
    assert cases["central"]["repeats"]["mean"] == 12.0
    assert cases["central"]["repeats"]["std"] == pytest.approx(2.0)
    assert cases["a"]["repeats"]["seconds_per_round"] == [12.0, 21.0, None]
    assert cases["a"]["repeats"]["status"] == ["ok", "ok", "failed"]
    ratio = bench.paired_ratio(runs, "a", "central")
    assert ratio["cases"] == ["a", "central"]
    assert ratio["values"] == pytest.approx([1.2, 1.5])  # the third repeat's case failed
    assert ratio["median"] == ratio["mean"] == pytest.approx(1.35)
    assert ratio["std"] == pytest.approx(0.3 / math.sqrt(2))
    three = [{"a": rec(r), "b": rec(1.0)} for r in (1.4, 1.6, 0.6)]  # one disturbed repeat
    assert bench.paired_ratio(three, "a", "b")["median"] == pytest.approx(1.4)
    assert bench.paired_ratio(runs[2:], "a", "central")["median"] is None
