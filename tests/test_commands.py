"""Every command answers --help (exit 0) and exits 2 on a misspelt key, naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT, TINY, make_cfg

COMMANDS = {  # command -> module run with `python -m`
    "cnfgnn": "cnfgnn.cli",
    "cnfgnn-data": "cnfgnn.data.cli",
    "cnfgnn-compare": "cnfgnn.compare",
    "cnfgnn-report": "cnfgnn.report",
    "cnfgnn-forecast": "cnfgnn.forecast.cli",
    "cnfgnn-robustness": "cnfgnn.forecast.robustness",
    "cnfgnn-bench": "cnfgnn.bench.engines",
    "cnfgnn-deploy": "cnfgnn.deploy",
}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        MPLBACKEND="Agg",
        FLWR_HOME=str(tmp / ".flwr"),
        TMPDIR=str(tmp),
        RAY_TMPDIR=str(tmp),
        FLWR_TELEMETRY_ENABLED="0",
    )
    return env


def _run_all(
    argvs: dict[str, list[str]], tmp: Path, env: dict[str, str] | None = None
) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands side by side (each is mostly interpreter start-up); every process
    started here is waited for, and killed if the test stops early."""
    procs: dict[str, subprocess.Popen] = {}
    out: dict[str, subprocess.CompletedProcess] = {}
    try:
        for name, argv in argvs.items():
            procs[name] = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp,
                env=env or _env(tmp),
            )
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_help_prints_usage_and_examples(tmp_path):
    runs = _run_all({c: [sys.executable, "-m", m, "--help"] for c, m in COMMANDS.items()}, tmp_path)
    for command, res in runs.items():
        assert res.returncode == 0, (command, res.stderr[-2000:])
        assert "Usage" in res.stdout, command
        assert command.split()[-1].split(".")[-1] in res.stdout, command
        assert res.stdout.count("\n") >= 5, command  # usage and examples, not a one-liner


def _fake_run(tmp: Path) -> Path:
    """A run directory as far as the argument checks look (config.yaml, checkpoint.pt)."""
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(make_cfg(*TINY), resolve=True))
    (run / "checkpoint.pt").write_bytes(b"")
    return run


def test_misspelt_keys_exit_2_naming_the_key_and_its_close_match(tmp_path):
    run = str(_fake_run(tmp_path))
    cases = {  # command -> (arguments, the misspelt key, the close match it should name)
        "cnfgnn": (["federation.roundz=2"], "federation.roundz", "federation.rounds"),
        "cnfgnn-data": (["info", "dataset.num_nodez=3"], "dataset.num_nodez", "dataset.num_nodes"),
        "cnfgnn-compare": (["compare.budget_epoch=2"], "budget_epoch", "compare.budget_epochs"),
        "cnfgnn-report": ([run, "outt=x"], "outt", "'out'"),
        "cnfgnn-forecast": ([run, "threadz=2"], "threadz", "'threads'"),
        "cnfgnn-robustness": ([run, "silense=0.1"], "silense", "'silence'"),
        "cnfgnn-bench": (["bench.roundz=2"], "bench.roundz", "bench.rounds"),
        "cnfgnn-deploy": (["run", "federation.roundz=2"], "federation.roundz", "federation.rounds"),
    }
    assert set(cases) == set(COMMANDS)
    argvs = {c: [sys.executable, "-m", COMMANDS[c], *a] for c, (a, _, _) in cases.items()}
    # a misspelt experiment is refused (Hydra alone would run the default quietly)
    argvs["experiment"] = [sys.executable, "-m", "cnfgnn.cli", "experiment=synthetic_cnfgn"]
    cases["experiment"] = ([], "synthetic_cnfgn", "'synthetic_cnfgnn'")
    for command, res in _run_all(argvs, tmp_path).items():
        _, key, close = cases[command]
        assert res.returncode == 2, (command, res.stderr[-2000:])
        assert key in res.stderr and close in res.stderr, (command, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, command


def test_deploy_sh_answers_help(tmp_path):
    env = _env(tmp_path) | {"PYTHON": sys.executable}
    res = _run_all({"sh": ["bash", str(ROOT / "launch" / "deploy.sh"), "--help"]}, tmp_path, env)[
        "sh"
    ]
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Usage" in res.stdout and "cnfgnn-deploy run" in res.stdout


BAD_INPUT_IN_RUN = {  # arguments -> what the one line must say
    "missing data file": (
        ["dataset=csv", "dataset.series=nope.csv", "dataset.adjacency=nope_adj.csv"],
        ["nope.csv", "Fix:"],
    ),
    "bad process count": (  # before any client process starts
        [*TINY, "federation.nodes_per_client=1", "engine.processes=two"],
        ["engine.processes='two'", "Fix: engine.processes=auto"],
    ),
    "bad poll share": (  # before Ray starts
        [*TINY, "engine=simulation", "engine.poll_busy_share=2"],
        ["engine.poll_busy_share=2", "Fix: engine.poll_busy_share=0.05"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_IN_RUN))
def test_bad_input_found_in_the_run_is_one_line_and_exit_2(tmp_path, case):
    """Bad input found inside the run (after Hydra composed the config) is reported like a
    misspelt key: one line naming the file or key and the fix, exit 2, no traceback."""
    args, said = BAD_INPUT_IN_RUN[case]
    argv = [sys.executable, "-m", "cnfgnn.cli", *args, f"output_root={tmp_path / 'out'}"]
    res = _run_all({"cnfgnn": argv}, tmp_path)["cnfgnn"]
    assert res.returncode == 2, res.stderr[-2000:]
    assert all(s in res.stderr for s in said), res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
