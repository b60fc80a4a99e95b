"""cnfgnn.procs: child processes in their own process groups, followed and stopped by id."""

from __future__ import annotations

import os
import sys

from cnfgnn.procs import ProcessSet, split_overrides

CHILD = (
    "import sys, time; print('first', flush=True); time.sleep(0.3); "
    "sys.stdout.write('half'); sys.stdout.flush(); time.sleep(0.3); print(' line'); "
    "print('last', end=''); sys.exit(3)"
)


def test_follow_passes_whole_lines_and_returns_status_and_peak_memory(tmp_path):
    procs = ProcessSet(tmp_path, dict(os.environ))
    procs.start("child", [sys.executable, "-c", CHILD], cwd=tmp_path)
    lines: list[str] = []
    code, peak_mb = procs.follow("child", lines.append, poll_s=0.02)
    assert lines == ["first\n", "half line\n", "last"]  # not the start line of the log
    assert code == 3 and peak_mb > 1.0
    assert procs.procs["child"].popen.returncode == 3 and procs.leftovers() == []
    procs.stop_all()  # nothing left to stop: must not wait on the reaped process


def test_split_overrides_parts_options_from_hydra_overrides():
    assert split_overrides(["--out", "x", "--", "seed=1", "--", "a=2"]) == (
        ["--out", "x"],
        ["seed=1", "--", "a=2"],
    )
    assert split_overrides(["--out", "x"]) == (["--out", "x"], [])
    assert split_overrides(["--"]) == ([], [])
