"""``cnfgnn-deploy superlink|supernode|run --superlink`` (cnfgnn/deploy/sites.py): the command
lines they build and the errors they give, without starting Flower. The processes themselves
run in tests/deployment/test_separated.py."""

from __future__ import annotations

import argparse
import tomllib

import pytest

from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.shards import write_shards
from cnfgnn.deploy import launcher as deploy
from cnfgnn.deploy import sites
from tests.helpers import TINY, make_cfg


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    sites.add_parsers(sub)
    return p.parse_args(list(argv))


@pytest.fixture
def shard(tmp_path):
    out = write_shards(load_dataset(make_cfg(*TINY).dataset), tmp_path / "shards", 2)
    return out / "client_0001"


def test_a_site_keeps_its_runtime_api_on_its_own_loopback(tmp_path, shard, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    a = _parse(
        "supernode",
        "--superlink",
        "10.1.2.3:9093",
        "--shard",
        str(shard),
        "--partition",
        "1",
        "--num-partitions",
        "3",
        "--ca-cert",
        "ca.crt",
        "--auth-key",
        "key",
        "--runtime-port",
        "9200",
    )
    argv = sites.supernode_argv(a)
    flower = argv[argv.index("--") + 1 :]
    assert flower[flower.index("--superlink") + 1] == "10.1.2.3:9093"
    assert flower[flower.index("--host") + 1] == "127.0.0.1"
    assert flower[flower.index("--port") + 1] == "9200"
    assert flower[flower.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert flower[flower.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    node_config = flower[flower.index("--node-config") + 1]
    assert "partition-id=1 num-partitions=3" in node_config
    assert f'data-dir="{shard}"' in node_config
    assert f'state-dir="{tmp_path / "node_state"}"' in node_config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"partition": 3}, "not in 0..2"),
        ({"ca_cert": None}, "--ca-cert"),
        ({"auth_key": "missing_key"}, "private key not found"),
        ({"shard": "nowhere"}, "client shard not found"),
    ],
)
def test_a_site_command_names_what_is_wrong(tmp_path, shard, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.crt").write_text("x")
    a = _parse(
        "supernode",
        "--superlink",
        "h:1",
        "--shard",
        str(shard),
        "--partition",
        "0",
        "--num-partitions",
        "3",
        "--ca-cert",
        "ca.crt",
        "--auth-key",
        "ca.crt",
    )
    for k, v in change.items():
        setattr(a, k, v)
    with pytest.raises(deploy.DeployError, match=message):
        sites.supernode_argv(a)


def test_superlink_needs_certificates_or_insecure(tmp_path):
    a = _parse("superlink", "--host", "127.0.0.2")
    with pytest.raises(deploy.DeployError, match="--certs-dir"):
        sites._server_tls(a, tmp_path)
    a = _parse("superlink", "--host", "127.0.0.2", "--certs-dir", str(tmp_path))
    with pytest.raises(deploy.DeployError, match="ca.crt"):
        sites._server_tls(a, tmp_path)


def test_generated_certificates_name_the_given_hosts(tmp_path):
    from cryptography import x509

    a = _parse(
        "superlink",
        "--host",
        "0.0.0.0",
        "--hosts",
        "link.example.org",
        "192.0.2.10",
        "--supernode-keys",
        "2",
    )
    ca, cert, key, keys = sites._server_tls(a, tmp_path)
    san = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} >= {"192.0.2.10", "127.0.0.1"}
    assert [k.name for k in keys] == ["supernode_0", "supernode_1"]
    assert all(k.with_name(k.name + ".pub").is_file() for k in keys)
    assert (key.stat().st_mode & 0o777) == 0o600


def test_the_submitted_app_is_only_a_pyproject(tmp_path):
    app = deploy.app_dir(tmp_path / "app")  # what every `flwr run` submits, loopback too
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    conf = tomllib.loads((app / "pyproject.toml").read_text())
    assert conf["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "cnfgnn.flower.server_app:app",
        "clientapp": "cnfgnn.flower.client_app:app",
    }
    assert conf["tool"]["flwr"]["app"]["config"] == {"hydra-overrides": ""}


def test_the_loopback_launcher_separates_the_two_addresses(tmp_path, shard, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    cfg = deploy.compose([*TINY, "engine.launch.host=127.0.0.2"])
    dep = deploy.Deployment(cfg, tmp_path / "run", shard.parent, progress=lambda s: None)
    try:
        flower = dep.supernode_argv(0)
        flower = flower[flower.index("--") + 1 :]
        assert flower[flower.index("--superlink") + 1] == f"127.0.0.2:{dep.link_port}"
        assert flower[flower.index("--host") + 1] == "127.0.0.1"
    finally:
        dep.stop()


def test_a_misspelt_experiment_is_refused_before_anything_starts():
    """Hydra alone skips a missing optional ``experiment=`` and runs the default one."""
    from cnfgnn.shell import UsageError

    with pytest.raises(UsageError, match="synthetic_cnfgnn"):
        deploy.compose(["experiment=synthetic_cnfgnnn"])
    assert deploy.compose(["experiment=synthetic_deploy_demo"]).engine.name == "deployment"


def test_the_loopback_deployment_writes_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("FLWR_HOME", "TMPDIR", "RAY_TMPDIR"):
        monkeypatch.delenv(key, raising=False)
    env = deploy.flower_env()
    assert env["FLWR_HOME"] == str(tmp_path / ".flwr")
    run_dir = deploy.default_run_dir(deploy.compose(["experiment=synthetic_deploy_demo"]))
    assert run_dir.parts[:2] == ("outputs", "deploy")  # relative: under the working directory
