"""The backplane's TLS files, read once at start-up into what Twisted's TLS takes.

The settings only name the files (:mod:`pubsub.operations.config` checks what can be
told without reading them); here they are read and loaded, so that a
missing or bad file stops the start-up with one line naming the setting,
rather than every TLS handshake with Redis failing later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL.crypto import Error as CryptoError
from twisted.internet.error import VerifyError
from twisted.internet.ssl import Certificate, PrivateCertificate, trustRootFromCertificates

from pubsub.operations.config import ConfigError, Settings

__all__ = ["BackplaneTLS", "backplane_tls"]


@dataclass(frozen=True)
class BackplaneTLS:
    """What the backplane's TLS needs, read from the files the settings name."""

    #: The CAs that sign Redis's certificate (an IOpenSSLTrustRoot); None:
    #: the system's trust store.
    trust_root: Any = None
    #: The client certificate with its key (a PrivateCertificate); None: none.
    client_certificate: Any = None


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"setting {name}: cannot read {path}: {error.strerror}") from None


#: A PEM certificate block; a CA file may hold several (a bundle).
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def backplane_tls(settings: Settings) -> BackplaneTLS:
    """Read and check the backplane's TLS files, at start-up: a ConfigError
    names the setting and the file when one is missing or does not load, rather
    than every TLS handshake failing later."""
    trust_root = None
    ca = settings.backplane_tls_ca.strip()
    if ca:
        data = _read("backplane_tls_ca", ca)
        blocks = [_PEM_CERTIFICATE + block for block in data.split(_PEM_CERTIFICATE)[1:]]
        try:
            certificates = [Certificate.loadPEM(block) for block in blocks]
        except CryptoError:
            certificates = []
        if not certificates:
            raise ConfigError(
                f"setting backplane_tls_ca: {ca} holds no PEM certificate "
                "(BEGIN CERTIFICATE) that loads"
            )
        trust_root = trustRootFromCertificates(certificates)
    client_certificate = None
    cert, key = settings.backplane_tls_cert.strip(), settings.backplane_tls_key.strip()
    if cert and key:
        cert_data = _read("backplane_tls_cert", cert)
        key_data = _read("backplane_tls_key", key)
        try:
            Certificate.loadPEM(cert_data)
        except CryptoError:
            raise ConfigError(
                f"setting backplane_tls_cert: {cert} holds no PEM certificate "
                "(BEGIN CERTIFICATE) that loads"
            ) from None
        try:
            client_certificate = PrivateCertificate.loadPEM(cert_data + b"\n" + key_data)
        except CryptoError:
            raise ConfigError(
                f"setting backplane_tls_key: {key} holds no unencrypted PEM private key that loads"
            ) from None
        except VerifyError:
            raise ConfigError(
                f"setting backplane_tls_key: {key} is not the key of the certificate in {cert}"
            ) from None
    return BackplaneTLS(trust_root, client_certificate)
