"""TLS server credentials that follow their files: the certificate, key and client CA are read at
start and again when they change, so a certificate renewed in place (cert-manager writing a
Kubernetes secret) is served to new connections without a restart.

gRPC's dynamic server credentials ask `ReloadingCertificates.fetch` for a configuration on every
new TLS handshake, from a gRPC core thread; it re-reads the files at most once per check interval
and answers None (keep the current one) unless they hold a new, valid set. A set that is not valid
(garbage, a key that does not match the certificate, a file half-written) keeps the old
credentials and is logged once, as one error line, however many handshakes see it. Connections
already open keep the certificate they were made with: that is TLS.

Validation uses the standard library's `ssl` (OpenSSL), which loads a key only from a path: the
files are read, checked by path, and read again; a set that changed meanwhile is being written,
and is looked at again at the next check.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL_S = 1.0
"""How often, at most, a handshake makes the server look at the files again."""

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def read_nonempty(path: str, what: str) -> bytes:
    """The file's bytes; a missing, unreadable or blank file is one ConfigError naming `what`."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path!r}: {error.strerror}") from None
    if not data.strip():
        raise ConfigError(f"the {what} {path!r} is empty")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's TLS material lives; `client_ca` set means mutual TLS."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True)
class TlsMaterial:
    """One set of the files' contents, checked to be usable together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate (DER), as `openssl x509 -fingerprint -sha256` shows
        it, so an operator can tell which certificate is served."""
        return certificate_fingerprint(self.cert)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)],
                                                         root_certificates=self.client_ca)


def certificate_fingerprint(pem_chain: bytes) -> str:
    """SHA-256 fingerprint of the first certificate of a PEM chain, colon-separated hex."""
    start = pem_chain.index(_PEM_CERTIFICATE)
    der = ssl.PEM_cert_to_DER_cert(pem_chain[start:].decode("ascii"))
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


class FilesChanging(Exception):
    """The files changed while being read and checked: someone is writing them."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ConfigError("the key is encrypted; give an unencrypted PEM key")


def _read_all(files: TlsFiles) -> TlsMaterial:
    return TlsMaterial(
        cert=read_nonempty(files.cert, "TLS certificate (--tls-cert)"),
        key=read_nonempty(files.key, "TLS key (--tls-key)"),
        client_ca=(read_nonempty(files.client_ca, "client CA bundle (--tls-client-ca)")
                   if files.client_ca else None))


def _pem_certificates(data: bytes, what: str, path: str) -> None:
    """Raise ConfigError unless `data` is PEM holding at least one certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"the {what} {path!r} is not PEM certificates ({error})") from None


def load_material(files: TlsFiles) -> TlsMaterial:
    """Read the files and check that they make usable credentials: certificates that parse, a
    key that matches the certificate. Raises ConfigError saying what is wrong, or FilesChanging
    when the files changed while being checked (then what looked wrong may be a half-done
    update: a Kubernetes secret's swap between reading the certificate and the key)."""
    material = _read_all(files)
    try:
        _check(files, material)
    except (ConfigError, FilesChanging):
        if _read_all(files) != material:
            raise FilesChanging("the TLS files changed while being read") from None
        raise
    if _read_all(files) != material:
        raise FilesChanging("the TLS files changed while being read")
    return material


def _check(files: TlsFiles, material: TlsMaterial) -> None:
    _pem_certificates(material.cert, "TLS certificate (--tls-cert)", files.cert)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert, files.key,
                                                                password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"the TLS key (--tls-key) {files.key!r} does not match the "
                              f"certificate (--tls-cert) {files.cert!r}") from None
        raise ConfigError(f"cannot use the TLS key (--tls-key) {files.key!r} with the "
                          f"certificate {files.cert!r}: {error}") from None
    except ConfigError as error:  # from _no_password
        raise ConfigError(f"cannot use the TLS key (--tls-key) {files.key!r}: {error}") from None
    except OSError as error:  # gone between the read and the check
        raise FilesChanging(str(error)) from None
    if material.client_ca is not None:
        _pem_certificates(material.client_ca, "client CA bundle (--tls-client-ca)",
                          str(files.client_ca))


def _load_at_start(files: TlsFiles, attempts: int = 3) -> TlsMaterial:
    for _ in range(attempts - 1):
        try:
            return load_material(files)
        except FilesChanging:
            continue
    try:
        return load_material(files)
    except FilesChanging:
        raise ConfigError(f"the TLS files {files.cert!r} and {files.key!r} kept changing while "
                          "being read; start again once they are written") from None


class ReloadingCertificates:
    """The current TLS material, and gRPC credentials that take a new set when the files hold
    one. Construction reads and checks the files (ConfigError if they are unusable)."""

    def __init__(self, files: TlsFiles, check_interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if check_interval_s is None:
            check_interval_s = DEFAULT_CHECK_INTERVAL_S
        if check_interval_s < 0:
            raise ValueError("check_interval_s must be >= 0")
        self.files = files
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._current = _load_at_start(files)
        self._rejected: object = None  # the last set refused (its contents or its error)
        self._next_check = clock() + check_interval_s
        self._checking = threading.Lock()

    @property
    def current(self) -> TlsMaterial:
        return self._current

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(  # the stubs miss fetch's None ("no change")
            self._current.configuration(), self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.files.client_ca is not None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake question: a new configuration, or None to keep the current one.
        Never raises (it runs in a gRPC core thread), and is cheap between checks."""
        now = self._clock()
        if now < self._next_check or not self._checking.acquire(blocking=False):
            return None
        try:
            self._next_check = now + self._check_interval_s
            return self.check()
        except Exception:  # noqa: BLE001 - a bug here must not break handshakes
            log.exception("checking the TLS files for a new certificate failed; serving the "
                          "current one")
            return None
        finally:
            self._checking.release()

    def check(self) -> grpc.ServerCertificateConfiguration | None:
        """Look at the files now: the new configuration when they hold a new valid set."""
        try:
            material = load_material(self.files)
        except FilesChanging:
            return None  # being written: look again at the next check
        except ConfigError as error:
            rejected = (str(error), _snapshot(self.files))
            if self._rejected != rejected:  # once per bad set, not once per handshake
                self._rejected = rejected
                log.error("TLS files changed but cannot be used, so the server keeps its "
                          "current certificate (sha256 %s): %s", self._current.fingerprint, error)
            return None
        if material == self._current:
            return None
        previous, self._current, self._rejected = self._current, material, None
        log.info("TLS files changed: new connections get the certificate with sha256 %s%s",
                 material.fingerprint,
                 " and the new client CA bundle" if material.client_ca != previous.client_ca
                 else "")
        return material.configuration()


def _snapshot(files: TlsFiles) -> tuple[bytes | None, ...]:
    """The files' contents as far as they can be read: what identifies a refused set."""
    contents = []
    for path in (files.cert, files.key, files.client_ca):
        try:
            contents.append(Path(path).read_bytes() if path else None)
        except OSError:
            contents.append(None)
    return tuple(contents)
