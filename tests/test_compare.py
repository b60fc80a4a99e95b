"""cnfgnn-compare and cnfgnn-report: one budget for every method, several seeds with a
mean ± std per method, tables equal the runs' own final metrics, failures do not stop the
others (and all failing is said plainly), plots are written."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnfgnn import compare, report
from cnfgnn.experiment import run_experiment
from cnfgnn.shell import UsageError
from tests.helpers import TINY, make_cfg

REQUIRED = ["method", "rmse", "mae_h3", "mae_h6", "mae_h12", "bytes", "seconds"]


def _plan(*args: str) -> dict[str, list[str]]:
    conf, runs = compare.compare_config(list(args))
    return compare.plan(conf, runs)


def _value(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def test_every_method_gets_the_same_budget_of_local_epochs():
    plans = _plan("compare.run=all", "compare.budget_epochs=10", "dataset.num_nodes=6")
    assert set(plans) == {
        "cnfgnn",
        "gru_local",
        "gru_fedavg",
        "gru_central",
        "gru_gn_central",
        "gru_fmtl",
        "split_learning",
        "at_no_fedavg",
    }
    for name, overrides in plans.items():
        cfg = compare.compose_run(overrides)
        assert cfg.federation.rounds * cfg.federation.local_epochs == 10, name
        assert cfg.dataset.num_nodes == 6  # the user's overrides reach every run
    assert _value(plans["gru_local"], "federation.rounds") == "2"  # 5 epochs a round, as the paper
    # a budget the preset's R_c does not divide: R_c shrinks, the budget stays exact
    local = compare.compose_run(
        _plan("compare.run=[gru_local]", "compare.budget_epochs=3")["gru_local"]
    )
    assert (local.federation.rounds, local.federation.local_epochs) == (1, 3)


def test_bad_settings_are_refused_before_anything_runs():
    with pytest.raises(UsageError, match="unknown method"):
        _plan("compare.run=[cnfgnn,gru_magic]")
    with pytest.raises(UsageError, match="unknown setting"):
        _plan("compare.budget=3")
    with pytest.raises(UsageError, match="do not compose"):
        _plan("compare.run=[cnfgnn]", "dataset=no_such_dataset")
    with pytest.raises(UsageError, match="at least 1"):
        _plan("compare.budget_epochs=0")
    for bad in ("compare.jobs=0", "compare.jobs=two", "compare.jobs=1.5"):
        with pytest.raises(UsageError, match="compare.jobs"):
            _plan(bad)


def test_runs_at_once_share_the_cores_unless_threads_is_given(monkeypatch):
    monkeypatch.setattr(compare, "cores", lambda: 4)
    conf, runs = compare.compare_config(["compare.jobs=2"])
    assert compare.width_and_threads(conf, runs, pending=8) == (2, ["threads=2"])
    assert compare.width_and_threads(conf, runs, pending=1) == (1, [])  # one run: all cores
    conf, runs = compare.compare_config(["compare.jobs=9"])
    assert compare.width_and_threads(conf, runs, pending=8) == (4, ["threads=1"])  # one per core
    conf, runs = compare.compare_config(["compare.jobs=2", "threads=3"])
    assert compare.width_and_threads(conf, runs, pending=8) == (2, [])  # the user's threads kept
    conf, runs = compare.compare_config(["compare.jobs=1"])
    assert compare.width_and_threads(conf, runs, pending=8) == (1, [])
    monkeypatch.setattr(compare, "cores", lambda: 1)
    conf, runs = compare.compare_config([])
    assert compare.width_and_threads(conf, runs, pending=8) == (1, [])


def test_ctrl_c_stops_every_run_in_flight_and_starts_no_more(tmp_path):
    flight = compare.RunsInFlight()
    sets = [compare.ProcessSet(tmp_path / str(i), {}) for i in range(2)]
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    for i, procs in enumerate(sets):
        assert flight.start(procs, f"run{i}", sleep, tmp_path / f"{i}.log")
    assert all(procs.procs[f"run{i}"].alive() for i, procs in enumerate(sets))
    flight.stop()
    assert not any(procs.procs[f"run{i}"].alive() for i, procs in enumerate(sets))
    assert all(procs.leftovers() == [] for procs in sets)
    late = compare.ProcessSet(tmp_path / "late", {})
    assert not flight.start(late, "late", sleep, tmp_path / "late.log")
    assert late.procs == {}


def test_seeds_default_to_the_runs_own_seed_and_are_checked():
    conf, runs = compare.compare_config([])
    assert compare.seeds_of(conf, runs) == [42]  # conf/config.yaml's seed: `make run` as before
    conf, runs = compare.compare_config(["seed=7"])
    assert compare.seeds_of(conf, runs) == [7]
    conf, runs = compare.compare_config(["compare.seeds=[42,43,44]"])
    assert compare.seeds_of(conf, runs) == [42, 43, 44]
    for bad in ("compare.seeds=[1,1]", "compare.seeds=[]", "compare.seeds=[a]"):
        with pytest.raises(UsageError, match="distinct whole numbers"):
            compare.compare_config([bad])


SEEDS = (42, 43)


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """A tiny comparison: CNFGNN and GRU local, 2 local epochs each, seeds 42 and 43."""
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    code = compare.main(
        [
            *TINY,
            "compare.run=[cnfgnn,gru_local]",
            "compare.seeds=[42,43]",
            "compare.budget_epochs=2",
            f"compare.out={out}",
            f"output_root={out}",
        ]
    )
    assert code == 0
    return out


def _final(out: Path, method: str, seed: int) -> dict:
    return json.loads((out / method / f"seed{seed}" / "final.json").read_text())


def test_comparison_table_holds_each_runs_own_test_metrics(compared):
    rows = [r for r in csv.DictReader(open(compared / "comparison.csv")) if r["seed"]]
    assert [(r["method"], int(r["seed"])) for r in rows] == [
        (m, s) for m in ("cnfgnn", "gru_local") for s in SEEDS
    ]
    assert set(REQUIRED) <= set(rows[0])
    for r in rows:
        final = _final(compared, r["method"], int(r["seed"]))
        assert float(r["rmse"]) == pytest.approx(final["test"]["rmse"])
        assert float(r["mae_h3"]) == pytest.approx(final["test"]["masked_mae_h3"])
        assert float(r["mae_h12"]) == pytest.approx(final["test"]["masked_mae_h12"])
        assert int(r["bytes"]) == final["bytes_total"]
        assert int(r["local_epochs"]) == 2  # the same budget for all
        assert float(r["peak_rss_mb"]) > 50  # measured per method process
        cfg = OmegaConf.load(compared / r["method"] / f"seed{r['seed']}" / "config.yaml")
        assert cfg.seed == int(r["seed"])  # each run trained with its own seed
    by = {r["method"]: r for r in rows}
    assert int(by["gru_local"]["params_server"]) == 0 < int(by["cnfgnn"]["params_server"])
    assert "CNFGNN" in (compared / "comparison.md").read_text()
    for name in ("forecasts", "horizons", "sensor_maps", "validation", "bytes"):
        img = mpimg.imread(compared / "plots" / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 400, name


def test_two_runs_go_at_once_by_default(compared):
    if compare.cores() < 2:
        pytest.skip("one core: runs go one after another")
    manifest = json.loads((compared / "compare.json").read_text())
    assert manifest["jobs"] == 2
    runs = list(manifest["runs"].values())
    assert len(runs) == 4
    assert all("threads=1" in r["overrides"] for r in runs)  # TINY's own, not overridden
    first_two = sorted(runs, key=lambda r: r["started_at"])[:2]
    assert first_two[1]["started_at"] < first_two[0]["ended_at"]  # they overlapped
    assert "2 runs at once" in (compared / "comparison.md").read_text()


def test_seeds_give_a_mean_and_std_row_per_method(compared):
    rows = list(csv.DictReader(open(compared / "comparison.csv")))
    means = {r["method"]: r for r in rows if not r["seed"]}
    assert set(means) == {"cnfgnn", "gru_local"}
    for method, r in means.items():
        assert int(r["runs"]) == len(SEEDS)
        for col, key in (("rmse", "rmse"), ("mae", "mae"), ("mae_h3", "masked_mae_h3")):
            values = [_final(compared, method, s)["test"][key] for s in SEEDS]
            assert float(r[col]) == pytest.approx(np.mean(values))
            assert float(r[f"{col}_std"]) == pytest.approx(np.std(values, ddof=1))
        assert float(r["rmse_std"]) > 0  # the seeds really differ
    md = (compared / "comparison.md").read_text()
    cnfgnn = means["cnfgnn"]
    assert f"{float(cnfgnn['rmse']):.3f} ± {float(cnfgnn['rmse_std']):.3f}" in md
    assert "Per seed" in md and "first seed" in md


def test_a_finished_run_is_kept_and_a_failing_one_does_not_stop_the_others(compared, capsys):
    before = _final(compared, "cnfgnn", 42)
    (compared / "gru_local" / "seed42" / "final.json").unlink()  # as if it had been interrupted
    # GRU local cannot run inductively (no model for unseen nodes): it fails, FedAvg still runs
    code = compare.main(
        [
            *TINY,
            "compare.run=[cnfgnn,gru_local,gru_fedavg]",
            "compare.seeds=[42]",
            "compare.budget_epochs=2",
            f"compare.out={compared}",
            "compare.force=false",
            "federation.inductive_ratio=0.5",
            f"output_root={compared}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "cnfgnn seed 42: done before" in out and "gru_local seed 42 FAILED" in out
    assert _final(compared, "cnfgnn", 42) == before  # not rerun
    assert (compared / "gru_fedavg" / "seed42" / "final.json").exists()
    assert (compared / "gru_local" / "seed43" / "final.json").exists()  # other seeds untouched
    assert list((compared / "gru_local").glob("seed42.prev-*"))  # the earlier try kept aside
    manifest = json.loads((compared / "compare.json").read_text())
    assert manifest["runs"]["gru_local/seed42"]["returncode"] != 0
    assert manifest["runs"]["gru_fedavg/seed42"]["seed"] == 42


def test_report_over_any_runs_and_the_reference_numbers(compared, tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("cnfgnn", "gru_local"):  # runs outside a compare directory
        shutil.copytree(compared / name / "seed43", sweep / "0" / name)
    assert report.main([str(sweep), f"out={tmp_path / 'rep'}"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "comparison.csv")))
    labels = sorted(r["label"] for r in rows)
    assert labels[0] == "CNFGNN" and labels[1].startswith("GRU (local, ")
    assert [r["seed"] for r in rows] == ["43", "43"]  # one seed each: no mean rows
    run = report.load_run(sweep / "0" / "cnfgnn")
    assert report.row(run)["reference_rmse"] is None  # no reported number for synthetic data
    run.cfg.dataset.name = "los-loop"  # as conf/dataset/los_loop.yaml names it
    assert report.row(run)["reference_rmse"] == 7.99
    with pytest.raises(UsageError, match="no finished run"):
        report.find_runs([tmp_path / "rep" / "plots"])


def test_when_every_method_fails_compare_and_report_say_so(tmp_path, capsys):
    out = tmp_path / "failed"
    code = compare.main(
        [
            *TINY,
            "dataset.days=0",
            "compare.run=[cnfgnn]",  # no data: fails
            "compare.budget_epochs=1",
            f"compare.out={out}",
            f"output_root={out}",
        ]
    )
    assert code == 1
    assert "every run failed (cnfgnn seed 42)" in capsys.readouterr().err
    assert not (out / "comparison.csv").exists()
    assert report.main([str(out)]) not in (0, None)  # a non-zero exit status
    assert "every one of its 1 runs failed" in capsys.readouterr().err


def test_report_shows_an_inductive_runs_seen_and_unseen_nodes(tmp_path):
    cfg = make_cfg(
        *TINY, "federation.rounds=1", "federation.inductive_ratio=0.5", f"output_root={tmp_path}"
    )
    final, writer = run_experiment(cfg, run_dir=tmp_path / "run", progress=lambda s: None)
    assert report.main([str(writer.dir), f"out={tmp_path / 'rep'}"]) == 0
    (r,) = csv.DictReader(open(tmp_path / "rep" / "comparison.csv"))
    for part in ("seen", "unseen"):
        assert float(r[f"rmse_{part}"]) == pytest.approx(final[f"test_{part}"]["rmse"])
        assert float(r[f"masked_mae_{part}"]) == pytest.approx(final[f"test_{part}"]["masked_mae"])
    assert r["rmse_seen"] != r["rmse_unseen"]
    md = (tmp_path / "rep" / "comparison.md").read_text()
    assert "RMSE seen / unseen" in md
    assert f"{final['test_seen']['rmse']:.3f} / {final['test_unseen']['rmse']:.3f}" in md


def test_sigterm_stops_every_running_method_and_keeps_the_output(tmp_path):
    """``cnfgnn-compare`` as a process: SIGTERM while two runs go stops both (no child left
    behind), exit status 130, the message says how to continue."""
    import os
    import signal
    import subprocess
    import time

    from cnfgnn.procs import cmdline_of

    out = tmp_path / "cmp"
    args = [*TINY, "federation.rounds=50", "compare.run=[cnfgnn,gru_fedavg]", f"compare.out={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnfgnn.compare", *args, f"output_root={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def children() -> list[int]:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        return [p for p in pids if f"run_dir={out}/" in cmdline_of(p)]

    try:
        deadline = time.monotonic() + 120
        while len(children()) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(children()) == 2  # both methods run at once
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted during cnfgnn seed 42, gru_fedavg seed 42" in text
    assert "run the same command to continue" in text
    assert children() == []
