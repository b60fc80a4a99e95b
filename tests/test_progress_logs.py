"""Progress bars (cnfgnn/progress.py), run logs (cnfgnn/logs.py), threads (cnfgnn/machine.py)
and TensorBoard curves (cnfgnn/curves.py)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import torch

from cnfgnn import curves, logs, machine, progress
from cnfgnn.federation import protocol as P
from tests.helpers import TINY, make_cfg


@pytest.fixture
def stderr(monkeypatch):
    """A non-terminal stderr; the test swaps it in (pytest's own capture is set by then)."""
    buf = io.StringIO()
    yield lambda: monkeypatch.setattr(sys, "stderr", buf) or buf
    progress.configure("auto")


def test_a_send_phase_counts_windows_and_clients(stderr):
    buf = stderr()
    progress.configure(True)
    payloads = {c: {P.SPLIT: P.VAL, P.H_G: None} for c in range(3)}
    with progress.send("val", P.EVALUATE, payloads, {P.VAL: 40}, 1) as phase:
        for k in range(1, 4):
            progress.answered(k, 3)  # a remote engine: the bar moves as clients answer
        assert phase.done == 120 and phase.bar.total == 120
        assert "3/3 clients" in str(phase.bar)
    text = buf.getvalue()
    assert "val:" in text and "win/s" in text
    # sends that are not a phase of their own (a split-learning step) open no bar
    with progress.send("split", P.SPLIT_STEP, payloads, {P.TRAIN: 40}, 1):
        pass
    assert buf.getvalue() == text


def test_no_bars_when_stderr_is_not_a_terminal_or_when_off(stderr):
    buf = stderr()
    for setting in ("auto", False):  # a StringIO is no terminal
        progress.configure(setting)
        with progress.phase("local", 10):
            progress.advance(10)
    assert buf.getvalue() == ""
    with pytest.raises(ValueError, match="auto, true or false"):
        progress.configure("sometimes")


def test_run_log_keeps_every_record_of_the_run(tmp_path):
    path = logs.attach_run_log(tmp_path)
    try:
        logging.getLogger("cnfgnn.some.module").debug("debug line %d", 7)
        logging.getLogger("cnfgnn.deploy.launcher").info("launcher line")
        logging.getLogger("elsewhere").info("not ours")
    finally:
        logs.detach_run_log()
    logging.getLogger("cnfgnn.x").info("after the run")
    text = path.read_text()
    assert "DEBUG cnfgnn.some.module: debug line 7" in text and "launcher line" in text
    assert "not ours" not in text and "after the run" not in text


def test_threads_null_uses_every_core_and_an_int_pins():
    before = torch.get_num_threads()
    try:
        assert machine.set_threads(None) == machine.cores() == torch.get_num_threads()
        assert machine.set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(ValueError, match="null for all cores"):
            machine.set_threads(0)
    finally:
        torch.set_num_threads(before)


RECORD = {
    "round": 1,
    "train_loss": 0.9,
    "split_loss": 0.8,
    "val_loss": 0.7,
    "val_rmse": 9.5,
    "val_mae": 4.1,
    "val_masked_mae": 3.9,
    "step": 12,
    "seconds_round": 2.5,
    "seconds": {"local": 1.0, "split": 1.2},
    "failures": 0,
    "bytes": {"local": {"up_tensor": 1000, "down_tensor": 800}},
}


def test_tags_of_a_round_record():
    tags = curves.tags(RECORD | {"val_rmse": float("nan")})
    assert tags["loss/train_loss"] == 0.9 and tags["loss/val_loss"] == 0.7
    assert tags["seconds/local"] == 1.0 and tags["seconds/round"] == 2.5
    assert tags["bytes/local/up_tensor"] == 1000.0 and tags["val/mae"] == 4.1
    assert "val/rmse" not in tags and "round" not in tags  # NaN skipped; round is the step


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cnfgnn.results import RunWriter

    cfg = make_cfg(*TINY, "logger=tensorboard", f"output_root={tmp_path}")
    writer = RunWriter(cfg, tmp_path / "run")
    for r in (1, 2):
        writer.log_round(RECORD | {"round": r, "val_loss": 0.7 / r})
    writer.curves.close()
    logs.detach_run_log()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(acc.Tags()["scalars"]) == set(curves.tags(lines[0]))
    events = acc.Scalars("loss/val_loss")
    assert [e.step for e in events] == [x["round"] for x in lines]
    assert [e.value for e in events] == pytest.approx([x["val_loss"] for x in lines])
    assert acc.Scalars("bytes/local/up_tensor")[-1].value == 1000.0
