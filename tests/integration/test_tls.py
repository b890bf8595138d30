"""TLS through a Twisted endpoint string, with a certificate made for the test.

The WebSocket port's front hands a TLS connection over by swapping the TLS
wrapper's protocol, not the TCP transport's; a pub/sub round trip over
``wss://`` and ``/healthz`` over ``https://`` check both hand-overs.
"""

from __future__ import annotations

import datetime
import ipaddress
import json

import pytest_twisted
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.operations.service import build_resource
from pubsub.resp.protocol import RespFactory
from pubsub.web.front import FrontFactory
from tests.integration.test_resp import in_thread
from tests.support import wsclient


def make_certificate(directory):
    """A self-signed certificate for 127.0.0.1; returns (key path, cert path, PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return key_path, cert_path, pem


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.factory.done.callback(self.data)


@pytest_twisted.inlineCallbacks
def test_wss_round_trip_and_https_health_through_the_front(tmp_path):
    key_path, cert_path, pem = make_certificate(tmp_path)
    engine = Engine()
    resource = build_resource(engine, Settings())
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    )
    port = yield endpoint.listen(FrontFactory(Site(resource)))
    number = port.getHost().port
    tls = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate.loadPEM(pem))
    try:
        alice = yield wsclient.connect(number, tls=tls)
        bob = yield wsclient.connect(number, tls=tls)
        assert (yield alice.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
        assert (yield bob.call("PUBLISH", "news", "over tls")) == [["reply", 1]]
        assert (yield alice.next_frame()) == ["message", "news", "over tls"]

        factory = Factory.forProtocol(_Body)
        factory.done = defer.Deferred()
        client = yield wrapClientTLS(
            tls, TCP4ClientEndpoint(reactor, "127.0.0.1", number, timeout=10)
        ).connect(factory)
        client.transport.write(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        response = yield factory.done
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["connections"] == 2
        for client in (alice, bob):
            client.dropConnection(abort=True)
            yield client.closed
    finally:
        yield port.stopListening()


def _redis_py_over_tls(port: int, cert_path) -> tuple:
    client = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert_path), socket_timeout=10
    )
    with client:
        return client.ping(), client.publish("news", "over TLS")


@pytest_twisted.inlineCallbacks
def test_resp_port_over_tls_with_a_redis_client(tmp_path, connect):
    key_path, cert_path, _ = make_certificate(tmp_path)
    engine = Engine()
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    )
    listening = yield endpoint.listen(RespFactory(engine, Settings(), reactor))
    try:
        subscriber = engine.register(_Collector())
        engine.subscribe(subscriber, [b"news"])
        pong, receivers = yield in_thread(_redis_py_over_tls, listening.getHost().port, cert_path)
        assert (pong, receivers) == (True, 1)
    finally:
        yield listening.stopListening()


class _Collector:
    """An engine subscriber in the application: its own encoder, keeping what came."""

    def __init__(self) -> None:
        self.encoder = self
        self.got: list = []

    def message(self, channel: bytes, payload: bytes) -> tuple:
        return (channel, payload)

    def deliver(self, frame) -> None:
        self.got.append(frame)
