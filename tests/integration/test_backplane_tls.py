"""The backplane over TLS (``rediss://``) to Debian's redis-server, with client certificates.

The test makes its own small PKI with ``cryptography``: a CA, a certificate for
Redis (SAN IP 127.0.0.1 and DNS localhost) and a client certificate for the
nodes, both signed by the CA, and a second CA that signs nothing Redis knows.
Redis listens on a TLS port only, with ``tls-auth-clients yes``: a node must
show a certificate the CA signed, and must trust the CA that signed Redis's.

An ACL user in the URL is tested over TLS and, here too, over plain TCP.

The nodes are real ``twistd pubsub`` processes (the installed package).  The
tests that expect a failure wait for the node's log line, then check that
the node stays down, answers PUBLISH with the BACKPLANE error, keeps
retrying and says so once.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor, task

from tests.integration.test_backplane import LOCAL, PREFIX, health, wait_for
from tests.integration.test_twistd import TWISTD, ServerWithResp, clean_environment
from tests.support.redis_server import RedisServer, RedisTLS
from tests.support.resp3 import RespError

#: Each test's own bound; the node start-up and polling bounds inside are lower.
pytestmark = pytest.mark.timeout(110)

TLS_FAILED = rb"backplane: TLS with (\S+) failed \((\w+)\): ([^\n]*); retrying"


# -- a PKI made for the test -------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def _write_cert(path: Path, certificate: x509.Certificate) -> str:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(path)


class CA:
    """A certificate authority that issues server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = _write_cert(directory / f"{name}.pem", self.certificate)

    def issue(self, name: str, *, server: bool, hosts: tuple[str, ...] = ()) -> tuple[str, str]:
        """A certificate and its key, as (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return (
            _write_cert(self.directory / f"{name}.pem", certificate),
            _write_key(self.directory / f"{name}-key.pem", key),
        )


class PKI:
    def __init__(self, directory: Path) -> None:
        self.ca = CA(directory, "ca")
        self.other_ca = CA(directory, "other-ca")  # signs nothing Redis or the nodes use
        self.server_cert, self.server_key = self.ca.issue(
            "redis", server=True, hosts=("127.0.0.1", "localhost")
        )
        self.client_cert, self.client_key = self.ca.issue("node", server=False)

    def redis_tls(self, server_cert: str = "", server_key: str = "", name: str = "") -> RedisTLS:
        """Redis's TLS files; ``name`` is the host its certificate is for."""
        return RedisTLS(
            cert=server_cert or self.server_cert,
            key=server_key or self.server_key,
            ca=self.ca.cert_path,
            client_cert=self.client_cert,
            client_key=self.client_key,
            server_name=name or "127.0.0.1",
        )

    def node_options(self) -> list[str]:
        """Everything a node needs: the CA of Redis's certificate, its own certificate."""
        return [
            "--backplane-tls-ca",
            self.ca.cert_path,
            "--backplane-tls-cert",
            self.client_cert,
            "--backplane-tls-key",
            self.client_key,
        ]


@pytest.fixture
def pki(tmp_path):
    directory = tmp_path / "pki"
    directory.mkdir()
    return PKI(directory)


@pytest.fixture
def tls_redis(tmp_path, pki):
    server = RedisServer(str(tmp_path), tls=pki.redis_tls())
    server.start()
    yield server
    server.stop()


# -- nodes -------------------------------------------------------------------------------


@pytest.fixture
def nodes(tmp_path):
    """start(url, *options) -> (node, ws port, resp port); every node gets SIGTERM after."""
    running: list = []

    @defer.inlineCallbacks
    def start(url: str, *options: str):
        node = ServerWithResp()
        args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", LOCAL, "--resp-port", LOCAL]
        args += ["--backplane", url, *options]
        transport = reactor.spawnProcess(
            node, TWISTD, args, env=clean_environment(), path=str(tmp_path)
        )
        running.append((node, transport))
        try:
            ws, resp = yield node.listening.addTimeout(60, reactor)
        except (defer.TimeoutError, RuntimeError):  # RuntimeError: it exited
            raise AssertionError(
                "the node did not start:\n" + node.output.decode(errors="replace")
            ) from None
        return node, ws, resp

    yield start
    for node, transport in running:
        if not node.ended.called:
            transport.signalProcess("TERM")
        pytest_twisted.blockon(node.ended.addTimeout(30, reactor))
        assert b"Traceback" not in node.output, node.output.decode(errors="replace")


def backplane_state(port: int):
    return health(port).addCallback(lambda body: body["backplane"]["state"])


def numsub(redis: RedisServer, channel: bytes):
    """Redis's own PUBSUB NUMSUB for ``channel``, over TLS (a short blocking call:
    the nodes are other processes)."""
    return defer.succeed(redis.call("PUBSUB", "NUMSUB", PREFIX + channel))


@defer.inlineCallbacks
def wait_for_output(node: ServerWithResp, pattern: bytes, what: str, count: int = 1):
    """Wait (at most 40 s) until ``pattern`` occurs ``count`` times in the node's log."""
    for _ in range(2000):
        if len(re.findall(pattern, node.output)) >= count:
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{what}: not in the log:\n" + node.output.decode(errors="replace"))


@defer.inlineCallbacks
def cross_node_delivery(redis: RedisServer, a: tuple, b: tuple, resp_connect, connect):
    """A RESP subscriber on node a, a WebSocket one on node b; each gets the other's publish."""
    (_, _, resp_a), (_, ws_b, resp_b) = a, b
    subscriber_a = yield resp_connect(resp_a)
    publisher_a = yield resp_connect(resp_a)
    subscriber_b = yield connect(ws_b)
    publisher_b = yield resp_connect(resp_b)
    yield subscriber_a.call("SUBSCRIBE", "news")
    assert (yield subscriber_b.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
    yield wait_for(lambda: numsub(redis, b"news"), [PREFIX + b"news", 2], "NUMSUB news")
    # From b to a: the count is b's own subscriber, a's arrives through Redis.
    assert (yield publisher_b.call("PUBLISH", "news", "from b")) == [1]
    assert (yield subscriber_a.next_value()) == [b"message", b"news", b"from b"]
    assert (yield subscriber_b.next_frame()) == ["message", "news", "from b"]
    # From a to b.
    assert (yield publisher_a.call("PUBLISH", "news", "from a")) == [1]
    assert (yield subscriber_b.next_frame()) == ["message", "news", "from a"]
    assert (yield subscriber_a.next_value()) == [b"message", b"news", b"from a"]
    assert (yield subscriber_a.drain()) == []  # nothing twice


# -- the tests ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_two_nodes_over_tls_with_client_certificates_act_as_one_broker(
    tls_redis, pki, nodes, resp_connect, connect
):
    url = f"rediss://127.0.0.1:{tls_redis.port}/"
    a = yield nodes(url, *pki.node_options())
    b = yield nodes(url, *pki.node_options())
    for _, ws, _ in (a, b):
        yield wait_for(lambda ws=ws: backplane_state(ws), "connected", "backplane state")
        assert (yield health(ws))["backplane"]["url"] == url
    yield cross_node_delivery(tls_redis, a, b, resp_connect, connect)
    for node, _, _ in (a, b):
        assert f"backplane: connected to {url}".encode() in node.output
        assert not re.search(TLS_FAILED, node.output)


@pytest.mark.parametrize("scheme", ["rediss", "redis"])
@pytest_twisted.inlineCallbacks
def test_an_acl_user_in_the_url_works_and_its_password_is_never_shown(
    scheme, tmp_path, pki, nodes, resp_connect, connect
):
    tls = scheme == "rediss"
    server = RedisServer(str(tmp_path), tls=pki.redis_tls() if tls else None)
    server.start()
    try:
        yield _acl_user_works(scheme, server, pki, nodes, resp_connect, connect)
    finally:
        server.stop()


@defer.inlineCallbacks
def _acl_user_works(scheme, server, pki, nodes, resp_connect, connect):
    # What a node needs, and no more (the rule docs/operations.md gives).
    rule = ["on", ">n0de-s3cret", "resetchannels", "&*", "-@all", "+@pubsub", "+ping", "+auth"]
    assert server.call("ACL", "SETUSER", "node", *rule) == b"OK"
    url = f"{scheme}://node:n0de-s3cret@127.0.0.1:{server.port}/"
    shown = f"{scheme}://node@127.0.0.1:{server.port}/"
    options = pki.node_options() if scheme == "rediss" else []
    a = yield nodes(url, *options)
    b = yield nodes(url, *options)
    for _, ws, _ in (a, b):
        yield wait_for(lambda ws=ws: backplane_state(ws), "connected", "backplane state")
        assert (yield health(ws))["backplane"]["url"] == shown
    # Both connections of both nodes are the ACL user's, as Redis sees them.
    clients = server.call("CLIENT", "LIST").decode()
    assert re.findall(r"\buser=(\S+)", clients).count("node") == 4, clients
    yield cross_node_delivery(server, a, b, resp_connect, connect)
    # Shard channels too: SSUBSCRIBE and SPUBLISH are in +@pubsub.
    (_, _, resp_a), (_, _, resp_b) = a, b
    subscriber = yield resp_connect(resp_a)
    publisher = yield resp_connect(resp_b)
    yield subscriber.call("SSUBSCRIBE", "shard")
    yield wait_for(
        lambda: defer.succeed(server.call("PUBSUB", "SHARDNUMSUB", PREFIX + b"shard")),
        [PREFIX + b"shard", 1],
        "SHARDNUMSUB shard",
    )
    assert (yield publisher.call("SPUBLISH", "shard", "sharded")) == [0]
    assert (yield subscriber.next_value()) == [b"smessage", b"shard", b"sharded"]
    for node, _, _ in (a, b):
        assert b"NOPERM" not in node.output, node.output.decode()
        assert b"n0de-s3cret" not in node.output
        assert f"backplane: connected to {shown}".encode() in node.output


@pytest.mark.parametrize(
    "case",
    ["no client certificate", "a CA that did not sign Redis's certificate", "another host"],
)
@pytest_twisted.inlineCallbacks
def test_a_tls_failure_keeps_the_node_down_logged_once_while_it_retries(
    case, tmp_path, pki, nodes, resp_connect
):
    if case == "another host":
        # Signed by the CA the node trusts, but for a name that is not 127.0.0.1.
        cert, key = pki.ca.issue("elsewhere", server=True, hosts=("redis.example",))
        tls = pki.redis_tls(cert, key, name="redis.example")
    else:
        tls = pki.redis_tls()
    redis = RedisServer(str(tmp_path), tls=tls)
    redis.start()
    try:
        url = f"rediss://127.0.0.1:{redis.port}/"
        options = pki.node_options()
        if case == "no client certificate":
            options = options[:2]  # the CA only
        elif case.startswith("a CA"):
            options[1] = pki.other_ca.cert_path
        node, ws, resp = yield nodes(url, *options)
        yield wait_for_output(node, TLS_FAILED, "the TLS failure")
        logged_url, _, reason = re.search(TLS_FAILED, node.output).groups()
        assert logged_url.decode() == url
        expected = {
            "no client certificate": b"certificate required",
            "a CA that did not sign Redis's certificate": b"certificate verify failed",
            "another host": b"is not for this host",
        }[case]
        assert expected in reason, reason
        # It goes on trying, with the backoff, and does not say it again.
        yield wait_for_output(node, rb"Scheduling retry \d+ to connect", "retries", count=8)
        assert len(re.findall(TLS_FAILED, node.output)) == 1, node.output.decode()
        body = yield health(ws)
        assert body["backplane"]["state"] == "connecting"
        assert body["backplane"]["url"] == url
        publisher = yield resp_connect(resp)
        [error] = yield publisher.call("PUBLISH", "news", "stays here")
        assert isinstance(error, RespError)
        assert str(error) == (
            f"BACKPLANE {url} is connecting: delivered to 0 local subscribers only"
        )
        assert isinstance(redis.call("PING"), bytes)  # Redis itself is fine
    finally:
        redis.stop()


def test_twistd_refuses_unusable_tls_settings_in_one_line(tmp_path, pki):
    from tests.integration.test_twistd import run_twistd

    other_cert, _ = pki.ca.issue("other", server=False)
    for options, message in [
        (
            ["--backplane", "redis://127.0.0.1:6379/", "--backplane-tls-ca", pki.ca.cert_path],
            # Settings that contradict each other are refused with the options.
            (
                "twistd -n: setting backplane_tls_ca is for TLS, but backplane is a redis:// "
                "URL (plain TCP): use rediss:// for TLS"
            ),
        ),
        (
            ["--backplane", "rediss://127.0.0.1:6379/", "--backplane-tls-cert", pki.client_cert],
            "twistd -n: setting backplane_tls_cert needs backplane_tls_key",
        ),
        (
            ["--backplane", "rediss://127.0.0.1:6379/", "--backplane-tls-ca", "absent.pem"],
            # The files are read when the service is made.
            "pubsub: setting backplane_tls_ca: cannot read absent.pem: No such file or directory",
        ),
        (
            ["--backplane", "rediss://127.0.0.1:6379/"]
            + ["--backplane-tls-cert", other_cert, "--backplane-tls-key", pki.client_key],
            (
                f"pubsub: setting backplane_tls_key: {pki.client_key} is not the key of the "
                f"certificate in {other_cert}"
            ),
        ),
    ]:
        result = run_twistd(tmp_path, "--port", LOCAL, *options)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert message in output, output
        assert "Traceback" not in output
