"""cnfgnn-bench: one small run of the central limit and the in-process engine, side by side."""

from __future__ import annotations

import json

from cnfgnn.bench import engines as bench
from tests.helpers import TINY

CASES = (
    "bench.engines=[{name:central,engine:central},"
    "{name:inprocess_all,engine:inprocess,nodes_per_client:null},"
    "{name:inprocess_per_sensor,engine:inprocess,nodes_per_client:1}]"
)


def test_bench_measures_engines_on_the_same_math(tmp_path, capsys):
    overrides = [o for o in TINY if not o.startswith("federation.rounds")] + [
        f"output_root={tmp_path}",
        CASES,
        "bench.count_flops=true",
        "bench.rounds=1",
        "bench.calibration.seconds_per_shape=0.02",
        "bench.message_overhead.clients=2",
        "bench.message_overhead.repeats=2",
    ]
    bench.main(overrides)
    doc = json.loads(capsys.readouterr().out)
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
    assert cases["central"]["per_round"]["round_trips"] == 0
    assert doc["ratios"]["inprocess_all/central"] > 0
    assert doc["goals"]["inprocess_all/central"]["at_most"] == 1.5
    proj = doc["projection"]
    assert proj["cases"]["central"]["round_seconds"] > cases["central"]["per_round"]["seconds"]
    assert proj["gpu"]["round_seconds"] > 0 and proj["central_flops_per_round"] > 0
    assert doc["machine"]["cores"] >= 1 and doc["device"] == "cpu"
    # against the calibrated matmul limit (threads=1 for every case), and the message overhead
    limit = doc["cpu_limit"]
    assert limit["calibrations"]["1"]["sustained"]["gflops"] > 0
    for name in cases:
        assert 0 < limit["cases"][name]["flop_fraction"] <= 1.5, name
    assert doc["message_overhead"]["status"] == "ok"
    assert doc["message_overhead"]["types"]["split_step"]["overhead_s"]["median"] is not None
