"""Certificates and keys for a secure loopback deployment (``engine.launch.secure=true``).

Usage::

    python -m cnfgnn.deploy.certs OUT_DIR [--nodes N] [--host 127.0.0.1] [--days 7]

writes, with the ``cryptography`` package (a dependency of flwr)::

    OUT_DIR/ca.crt, ca.key            a self-signed CA (EC P-384), valid ``--days``
    OUT_DIR/server.crt, server.key    the SuperLink's TLS certificate, signed by the CA, for
                                      IP 127.0.0.1 (and ``--host``) and DNS localhost
    OUT_DIR/supernode_<i>, .pub       SuperNode i's authentication key pair (EC P-384,
                                      OpenSSH format, as ``flower-supernode
                                      --auth-supernode-private-key`` and ``flwr supernode
                                      register`` read them)

Flower's use of them (flwr 1.42):

* ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile
  server.key --enable-supernode-auth``: HTTPS on its one port (Fleet, Control and
  ServerAppIo APIs); only SuperNodes whose public key was registered may join;
* ``flwr supernode register supernode_<i>.pub <connection>``, with ``root-certificates =
  ca.crt`` in the connection (``$FLWR_HOME/config.toml``);
* ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key supernode_<i>``
  and ``flower-superexec --root-certificates ca.crt``.

Private keys are written with mode 0600 into a directory of mode 0700. The files are for a
loopback test federation only: the CA key lies next to the certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1  # Flower's documentation uses P-384 for SuperNode keys


@dataclass(frozen=True)
class LoopbackCerts:
    """Paths of the files :func:`generate` wrote."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is ``<path>.pub``

    def node_public_key(self, i: int) -> Path:
        return self.node_keys[i].with_name(self.node_keys[i].name + ".pub")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` (mode 0600 for private keys, created so from the start)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cnfgnn loopback"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(days: float) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate (may sign certificates, not intermediate CAs)."""
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name("cnfgnn loopback CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], days: float
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (IP addresses or DNS names), signed by the CA."""
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # unique, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def write_node_key(path: Path, comment: str = "") -> Path:
    """A SuperNode key pair: ``path`` (OpenSSH private key, 0600) and ``path.pub``."""
    key = ec.generate_private_key(CURVE())
    _write(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(
        path.with_name(path.name + ".pub"),
        pub + (b" " + comment.encode() if comment else b"") + b"\n",
    )
    return path


def generate(
    out: Path,
    num_nodes: int,
    host: str = "127.0.0.1",
    days: float = 7.0,
    extra_hosts: tuple[str, ...] = (),
) -> LoopbackCerts:
    """Write a CA, a SuperLink certificate for ``host``, ``extra_hosts`` (IP addresses or
    DNS names), 127.0.0.1 and localhost, and ``num_nodes`` SuperNode key pairs into ``out``
    (replacing older ones)."""
    if num_nodes < 0 or days <= 0:
        raise ValueError(f"num_nodes={num_nodes}, days={days}: need num_nodes >= 0, days > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(
        ca_key, ca_cert, [host, *extra_hosts, "127.0.0.1", "localhost"], days
    )
    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.crt",
        "server_key": out / "server.key",
    }
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    _write(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_key"], _pem_key(server_key), private=True)
    _write(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    nodes = tuple(
        write_node_key(out / f"supernode_{i}", f"cnfgnn-supernode-{i}") for i in range(num_nodes)
    )
    return LoopbackCerts(out, node_keys=nodes, **paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cnfgnn.deploy.certs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path)
    p.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to write")
    p.add_argument("--host", default="127.0.0.1", help="the SuperLink's address")
    p.add_argument("--days", type=float, default=7.0, help="validity of the certificates")
    a = p.parse_args(argv)
    certs = generate(a.out, a.nodes, a.host, a.days)
    print(
        f"CA {certs.ca_cert}, SuperLink {certs.server_cert}, "
        f"{len(certs.node_keys)} SuperNode key pair(s) in {certs.dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
