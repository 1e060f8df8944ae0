"""A throwaway public-key infrastructure for TLS tests: a CA, a server certificate for loopback,
a client certificate from the same CA, and one from a CA the server does not trust; and more
server certificates from the same CA, for certificate rotation."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
           server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
           ) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def make_pki(directory: Path, ca_name: str = "summarizer test CA") -> Pki:
    """`ca_name` tells CAs apart: a verifier finds a certificate's issuer by name."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(ca_name, ca_key, _name(ca_name), ca_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _issue("rogue CA", rogue_key, _name("rogue CA"), rogue_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    rogue_client_key = ec.generate_private_key(ec.SECP256R1())
    _write(directory / "ca.pem", ca, ca_key)
    _write(directory / "server.pem", _issue("localhost", server_key, ca.subject, ca_key,
                                            server=True), server_key)
    _write(directory / "client.pem", _issue("client", client_key, ca.subject, ca_key),
           client_key)
    _write(directory / "rogue-client.pem",
           _issue("rogue client", rogue_client_key, rogue.subject, rogue_key), rogue_client_key)
    return Pki(ca_cert=directory / "ca.pem", ca_key=directory / "ca.key",
               server_cert=directory / "server.pem",
               server_key=directory / "server.key", client_cert=directory / "client.pem",
               client_key=directory / "client.key",
               rogue_client_cert=directory / "rogue-client.pem",
               rogue_client_key=directory / "rogue-client.key")


def issue_server_cert(pki: Pki, directory: Path, name: str) -> tuple[Path, Path]:
    """Another loopback server certificate (and its new key) from `pki`'s CA: what a renewal
    writes. Returns the certificate's path and the key's (`name`.pem, `name`.key)."""
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = directory / f"{name}.pem"
    _write(cert, _issue("localhost", key, ca.subject, ca_key, server=True), key)
    return cert, cert.with_suffix(".key")
