"""The run-time patches of Flower internals switch themselves off on another Flower version."""

import logging

import flwr
import pytest

from cnfgnn.deploy import clientworker, fastwaits


@pytest.fixture
def other_flower(monkeypatch):
    monkeypatch.setattr(flwr, "__version__", "9.99.0")
    return "9.99.0"


def test_fastwaits_warns_and_patches_nothing(other_flower):
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.start_client_internal as sci

    time_before, beat_before = sci.time, hb.HEARTBEAT_DEFAULT_INTERVAL
    with pytest.warns(RuntimeWarning, match="flwr 9.99.0 installed.*left as they are"):
        changed = fastwaits.patch_supernode(fastwaits.Waits(idle_poll_s=0.1, heartbeat_s=12))
    assert changed == {}
    assert sci.time is time_before and hb.HEARTBEAT_DEFAULT_INTERVAL == beat_before
    with pytest.raises(fastwaits.PatchError, match="9.99.0"):  # the strict check still says why
        fastwaits.check_targets()


def test_clientworker_hands_over_to_flower_superexec(other_flower, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(clientworker.os, "execv", lambda exe, args: calls.append((exe, args)))
    monkeypatch.setattr(clientworker, "serve", lambda *a, **k: pytest.fail("worker ran"))
    caplog.set_level(logging.INFO, logger="cnfgnn.clientworker")
    with pytest.warns(RuntimeWarning, match="flwr 9.99.0.*flower-superexec"):
        with pytest.raises(SystemExit):
            clientworker.main(["--runtime-api-address", "127.0.0.1:9101", "--parent-pid", "4242"])
    ((exe, args),) = calls
    assert exe.endswith("flower-superexec") and args[0] == exe
    assert args[1:] == [
        "--runtime-api-address",
        "127.0.0.1:9101",
        "--insecure",
        "--parent-pid",
        "4242",
    ]
    assert any(r.getMessage().startswith("ready") for r in caplog.records)  # launcher's cue


def test_checked_version_keeps_the_worker(monkeypatch):
    monkeypatch.setattr(flwr, "__version__", clientworker.FLOWER_VERSION)
    monkeypatch.setattr(clientworker.os, "execv", lambda *a: pytest.fail("fell back"))
    ran = []
    monkeypatch.setattr(clientworker, "serve", lambda *a, **k: ran.append(a))
    assert clientworker.main(["--runtime-api-address", "127.0.0.1:9101", "--preload", ""]) == 0
    assert ran and ran[0][0] == "127.0.0.1:9101"


def test_clientworker_stops_with_its_supernode_even_when_started_with_sigint_ignored():
    """The worker learns that its SuperNode exited through a SIGINT it raises itself; one
    started from a background job (a shell's ``cmd &`` ignores SIGINT for it) must still stop,
    not live on as an orphan."""
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnfgnn.deploy.clientworker",
            "--runtime-api-address",
            "127.0.0.1:9",  # nothing listens: the worker keeps polling
            "--parent-pid",
            str(parent.pid),
            "--preload",
            "",
        ],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3.0)
        assert worker.poll() is None  # still polling while its SuperNode lives
        parent.kill()
        parent.wait()
        assert worker.wait(timeout=30) == 0
    finally:
        for p in (worker, parent):
            if p.poll() is None:
                p.kill()
                p.wait()
