"""cnfgnn/deploy/certs.py and the secure command lines of cnfgnn/deploy/launcher.py, without
starting Flower:
the SuperLink certificate verifies against the generated CA (also in a real TLS handshake on
loopback), the SuperNode keys are what Flower's own loaders accept, and
``engine.launch.secure=true`` turns ``--insecure`` into TLS + SuperNode authentication."""

from __future__ import annotations

import importlib
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.shards import write_shards
from cnfgnn.deploy import certs
from cnfgnn.deploy import launcher as deploy
from tests.helpers import TINY


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return certs.generate(tmp_path_factory.mktemp("certs"), num_nodes=2)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(leaf, ca, name: x509.GeneralName):
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    return verifier.verify(leaf, [])


def test_server_certificate_chains_to_the_ca_for_loopback_names(made, tmp_path):
    ca, server = _cert(made.ca_cert), _cert(made.server_cert)
    chain = _verify(server, ca, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    assert chain[-1] == ca
    _verify(server, ca, x509.DNSName("localhost"))
    with pytest.raises(VerificationError):  # a name it was not issued for
        _verify(server, ca, x509.DNSName("example.org"))
    with pytest.raises(VerificationError):  # another CA does not vouch for it
        _verify(
            server, _cert(certs.generate(tmp_path / "other", 0).ca_cert), x509.DNSName("localhost")
        )
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)


def test_private_keys_are_private_and_match(made):
    for path in (made.ca_key, made.server_key, *made.node_keys):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(made.dir.stat().st_mode) == 0o700
    key = serialization.load_pem_private_key(made.server_key.read_bytes(), None)
    assert key.public_key() == _cert(made.server_cert).public_key()


def test_supernode_keys_are_what_flower_reads(made):
    register = importlib.import_module("flwr.cli.supernode.register")
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    seen = set()
    for i, path in enumerate(made.node_keys):
        priv = serialization.load_ssh_private_key(path.read_bytes(), None)  # as flower-supernode
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        assert isinstance(priv.curve, ec.SECP384R1)
        pub_bytes = register.try_load_public_key(made.node_public_key(i))  # as flwr register
        assert pub_bytes == public_key_to_bytes(priv.public_key())
        seen.add(pub_bytes)
    assert len(seen) == 2  # one key pair per SuperNode


def test_tls_handshake_on_loopback_trusts_only_the_generated_ca(made, tmp_path):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(made.server_cert, made.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        good = ssl.create_default_context(cafile=str(made.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with good.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        other = certs.generate(tmp_path / "other", 0)
        bad = ssl.create_default_context(cafile=str(other.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                bad.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="days"):
        certs.generate(tmp_path, 1, days=0)


@pytest.fixture
def tiny_shards(tmp_path):
    from tests.helpers import make_cfg

    return write_shards(load_dataset(make_cfg(*TINY).dataset), tmp_path / "shards", 3)


def test_secure_command_lines_and_connection(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from flwr.cli.flower_config import read_superlink_connection

    cfg = deploy.compose([*TINY, "engine.launch.secure=true"])
    dep = deploy.Deployment(cfg, tmp_path / "run", tiny_shards, progress=lambda s: None)
    try:
        assert dep.secure and dep.num_nodes == 2
        ca = str(tmp_path / "run" / "certs" / "ca.crt")
        link = dep.superlink_security_args()
        assert "--insecure" not in link and "--enable-supernode-auth" in link
        assert link[link.index("--ssl-ca-certfile") + 1] == ca
        assert link[link.index("--ssl-certfile") + 1].endswith("server.crt")
        assert link[link.index("--ssl-keyfile") + 1].endswith("server.key")
        assert dep.client_tls_args() == ["--root-certificates", ca]  # SuperExec, SuperNodes
        for i in range(2):
            argv = dep.supernode_argv(i)
            flower = argv[argv.index("--") + 1 :]
            assert "--insecure" not in flower
            assert flower[flower.index("--root-certificates") + 1] == ca
            key = flower[flower.index("--auth-supernode-private-key") + 1]
            assert key == str(dep.certs.node_keys[i]) and key.endswith(f"supernode_{i}")
            assert "--warm-worker" in argv  # the warm worker stays (it talks to the SuperNode)
            ours = argv[: argv.index("--")]  # preload now, connect after the key registration
            assert ours[ours.index("--start-after") + 1] == str(dep.gate)
        conn = read_superlink_connection(dep.connection)
        assert dep.connection.endswith("-tls") and not conn.insecure
        assert conn.root_certificates == ca and conn.address == f"127.0.0.1:{dep.link_port}"
    finally:
        dep.stop()
    assert dep.connection not in (tmp_path / "flwr" / "config.toml").read_text()

    plain = deploy.compose(
        [
            *TINY,
            "engine.launch.secure=true",
            "engine.launch.worker=flower",
            "engine.launch.fast_waits=false",
            "engine.launch.heartbeat_s=null",
        ]
    )
    dep = deploy.Deployment(plain, tmp_path / "run3", tiny_shards, progress=lambda s: None)
    try:  # Flower's own entry point cannot wait: it is started after the registration
        argv = dep.supernode_argv(1)
        assert argv[0].endswith("flower-supernode") and "--start-after" not in argv
        assert argv[argv.index("--auth-supernode-private-key") + 1].endswith("supernode_1")
    finally:
        dep.stop()

    dep = deploy.Deployment(
        deploy.compose(list(TINY)), tmp_path / "run2", tiny_shards, progress=lambda s: None
    )
    try:  # the default stays insecure, with no certificates written
        assert not dep.secure and dep.superlink_security_args() == ["--insecure"]
        flower = dep.supernode_argv(0)
        assert "--insecure" in flower and "--auth-supernode-private-key" not in flower
        assert not (tmp_path / "run2" / "certs").exists()
    finally:
        dep.stop()


def test_tls_connection_entry_replaces_a_stale_one(tmp_path):
    name = deploy.ensure_connection(tmp_path, "127.0.0.1:4567", tmp_path / "old_ca.crt")
    assert deploy.ensure_connection(tmp_path, "127.0.0.1:4567", tmp_path / "ca.crt") == name
    text = (tmp_path / "config.toml").read_text()
    assert text.count(f"[superlink.{name}]") == 1
    assert "old_ca.crt" not in text and str(tmp_path / "ca.crt") in text
    plain = deploy.ensure_connection(tmp_path, "127.0.0.1:4567")  # an insecure one beside it
    assert plain != name and "insecure = true" in (tmp_path / "config.toml").read_text()


def test_supernode_waits_for_the_gate_file(tmp_path):
    from cnfgnn.deploy.supernode import _wait_for_file

    gate = tmp_path / "keys_registered"
    with pytest.raises(SystemExit, match="did not appear"):
        _wait_for_file(str(gate), timeout_s=0.2)
    gate.touch()
    _wait_for_file(str(gate), timeout_s=0.2)  # returns at once


def test_register_needs_a_connection_and_named_keys(capsys):
    from cnfgnn.deploy.register import main

    assert main(["only-a-connection"]) == 2
    assert main(["conn", "no-equals-sign.pub"]) == 2
    assert "NAME=KEY.pub" in capsys.readouterr().err


def test_json_reply_is_found_after_other_output():
    text = 'Using SuperLink: x\n{\n  "success": true,\n  "nodes": [{"node-id": "7"}]\n}\nbye'
    assert deploy._json_in(text)["nodes"] == [{"node-id": "7"}]
    with pytest.raises(deploy.DeployError, match="no JSON"):
        deploy._json_in("no reply")
