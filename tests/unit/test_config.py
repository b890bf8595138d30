"""Settings: precedence, validation, the conf file and the twistd options."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from twisted.python import usage

from pubsub.backplane.tls import BackplaneTLS, backplane_tls
from pubsub.operations.config import (
    ConfigError,
    Settings,
    endpoint_description,
    listen_description,
    load_settings,
)
from pubsub.operations.service import Options, make_service

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "pubsub.toml"


def test_the_conf_file_lists_every_setting_with_its_default():
    with CONF.open("rb") as stream:
        table = tomllib.load(stream)
    defaults = Settings()
    assert set(table) == {f.name for f in fields(Settings)}
    for name, value in table.items():
        assert load_settings(CONF, environ={}).__getattribute__(name) == getattr(defaults, name)
        assert value == getattr(defaults, name)


def test_the_conf_file_comments_every_setting():
    lines = CONF.read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[index - 1].startswith("# "), f"no comment above {line!r}"


def test_the_operations_guide_lists_every_setting_with_its_default_and_help():
    rows = {}
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        if line.startswith("| `") and "`PUBSUB_" in line:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    assert set(rows) == {f.name for f in fields(Settings)}
    for f in fields(Settings):
        _, option, variable, default, meaning = rows[f.name]
        assert option.startswith(f"`--{f.name.replace('_', '-')}`")
        assert variable == f"`PUBSUB_{f.name.upper()}`"
        assert tomllib.loads(f"v = {default.strip('`')}")["v"] == f.default
        assert meaning == f.metadata["help"]


def test_the_resp_port_is_off_by_default_and_bound_like_the_websocket_port():
    assert Settings().resp_port == ""
    settings = Settings(resp_port="6380", interface="::1")
    assert endpoint_description(settings, settings.resp_port) == "tcp:6380:interface=\\:\\:1"
    assert endpoint_description(settings, "unix:/tmp/r.sock") == "unix:/tmp/r.sock"


@pytest.mark.parametrize(
    "port, backlog, description",
    [
        ("9000", 511, "tcp:9000:interface=127.0.0.1:backlog=511"),
        ("tcp:9000", 511, "tcp:9000:backlog=511"),
        ("unix:/tmp/r.sock", 511, "unix:/tmp/r.sock:backlog=511"),
        ("tcp:9000:backlog=5", 511, "tcp:9000:backlog=5"),  # the string's own
        ("ssl:9443:privateKey=k.pem", 100, "ssl:9443:privateKey=k.pem:backlog=100"),
        ("tcp:9000", 0, "tcp:9000"),  # Twisted's default
        ("systemd:domain=INET:index=0", 511, "systemd:domain=INET:index=0"),  # no backlog there
    ],
)
def test_the_listen_backlog_goes_into_endpoint_strings_that_take_one(port, backlog, description):
    assert listen_description(Settings(listen_backlog=backlog), port) == description


def test_the_default_bind_address_is_loopback():
    assert Settings().interface == "127.0.0.1"
    assert endpoint_description(Settings()) == "tcp:9000:interface=127.0.0.1"


def test_precedence_defaults_file_environment_command_line(tmp_path):
    conf = tmp_path / "pubsub.toml"
    conf.write_text(
        'max_message_size = 2000\nmax_connections = 7\nport = 9100\ninterface = "::1"\n'
    )
    environ = {"PUBSUB_MAX_CONNECTIONS": "8", "PUBSUB_MAX_SUBSCRIPTIONS": "9"}
    settings = load_settings(
        conf, environ=environ, overrides={"max_subscriptions": 10, "port": None}
    )
    assert settings.max_message_size == 2000  # file over default
    assert settings.max_connections == 8  # environment over file
    assert settings.max_subscriptions == 10  # command line over environment
    assert settings.port == "9100"  # None means "not given"
    assert settings.max_name_length == Settings().max_name_length
    assert endpoint_description(settings) == "tcp:9100:interface=\\:\\:1"


def test_without_config_the_file_under_the_current_directory_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}) == Settings()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pubsub.toml").write_text("max_connections = 3\n")
    assert load_settings(environ={}).max_connections == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("nope = 1\n", "unknown setting 'nope'"),
        ('max_connections = "many"\n', "max_connections must be an integer"),
        ("max_connections = 1.5\n", "max_connections must be an integer"),
        ("max_connections = true\n", "max_connections must be an integer"),
        ("port = [1]\n", "port must be a string"),
        ("max_message_size = -1\n", "max_message_size must not be negative"),
        ("port = = 3\n", "is not valid TOML"),
        ('port = ""\n', "port must not be empty"),
    ],
)
def test_bad_settings_files_are_refused_with_the_reason(tmp_path, text, message):
    conf = tmp_path / "pubsub.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(conf, environ={})


@pytest.mark.parametrize(
    "interval, timeout, message",
    [
        (0.0, 3.0, "backplane_ping_interval must be positive, got 0.0 .*backplane_timeout to 0"),
        (3.0, 3.0, r"backplane_ping_interval \(3.0\) must be less than backplane_timeout \(3.0\)"),
        (5.0, 2.0, "must be less than backplane_timeout"),
        (-1.0, 3.0, "backplane_ping_interval must not be negative"),
        (1.0, -3.0, "backplane_timeout must not be negative"),
        (1.0, float("inf"), "backplane_timeout must be a finite number"),
        (float("nan"), 3.0, "backplane_ping_interval must be a finite number"),
    ],
)
def test_the_backplane_health_check_settings_must_make_sense(interval, timeout, message):
    with pytest.raises(ConfigError, match=message):
        Settings(backplane_ping_interval=interval, backplane_timeout=timeout)


def test_a_backplane_timeout_of_zero_turns_the_check_off_whatever_the_interval():
    assert Settings(backplane_ping_interval=0.0, backplane_timeout=0.0).backplane_timeout == 0
    assert Settings(backplane_ping_interval=9.0, backplane_timeout=0.0).backplane_timeout == 0


def test_a_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read settings file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="PUBSUB_MAX_CONNECTIONS"):
        load_settings(environ={"PUBSUB_MAX_CONNECTIONS": "lots"})


def test_twistd_options_one_per_setting_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "custom.toml"
    conf.write_text("max_message_size = 5000\nmax_connections = 4\n")
    options = Options()
    options.parseOptions(["--config", str(conf), "--max-message-size", "6000", "--port", "tcp:0"])
    assert options.settings.max_message_size == 6000
    assert options.settings.max_connections == 4
    assert options.settings.port == "tcp:0"
    with pytest.raises(usage.UsageError, match="max_subscriptions must not be negative"):
        Options().parseOptions(["--max-subscriptions", "-1"])
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--max-connections", "many"])


def test_make_service_refuses_an_unusable_endpoint():
    with pytest.raises(ConfigError, match="setting port: cannot use 'bogus:1'"):
        make_service(Settings(port="bogus:1"))
    with pytest.raises(ConfigError, match="setting resp_port: cannot use 'bogus:2'"):
        make_service(Settings(resp_port="bogus:2"))


def test_make_service_serves_resp_on_the_same_engine_only_when_asked():
    assert make_service(Settings()).resp_factory is None
    service = make_service(Settings(resp_port="6380"))
    assert service.resp_factory.engine is service.engine is service.factory.engine
    assert len(list(service)) == 2  # the WebSocket and the RESP listener


def test_true_false_settings_are_flag_pairs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--compression", "--echo-endpoint"])
    assert options.settings.compression and options.settings.echo_endpoint
    conf = tmp_path / "on.toml"
    conf.write_text("compression = true\necho_endpoint = true\n")
    options = Options()
    options.parseOptions(["--config", str(conf), "--no-compression"])
    assert not options.settings.compression
    assert options.settings.echo_endpoint
    with pytest.raises(usage.UsageError, match="contradict"):
        Options().parseOptions(["--compression", "--no-compression"])


@pytest.mark.parametrize(
    "value, expected", [("1", True), ("yes", True), ("on", True), ("false", False), ("0", False)]
)
def test_true_false_settings_from_the_environment(value, expected):
    assert load_settings(environ={"PUBSUB_COMPRESSION": value}).compression is expected


def test_a_true_false_setting_refuses_anything_else(tmp_path):
    with pytest.raises(ConfigError, match="PUBSUB_COMPRESSION: setting compression must be true"):
        load_settings(environ={"PUBSUB_COMPRESSION": "maybe"})
    conf = tmp_path / "bad.toml"
    conf.write_text("compression = 1\n")
    with pytest.raises(ConfigError, match="compression must be true or false"):
        load_settings(conf, environ={})


def test_log_format_is_text_or_json():
    assert Settings().log_format == "text"
    assert load_settings(environ={"PUBSUB_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="log_format must be one of text, json, got 'xml'"):
        Settings(log_format="xml")


def test_the_new_limits_are_off_or_generous_by_default():
    defaults = Settings()
    assert defaults.allowed_origins == ""
    assert defaults.max_connections_per_ip == 0
    assert defaults.publish_rate == 0 and defaults.idle_timeout == 0
    # Pings keep proxied connections alive under nginx's 60 s read timeout.
    assert 0 < defaults.ping_interval < 60
    assert defaults.shutdown_timeout > 0


# -- the backplane's TLS files -------------------------------------------------------------


def _pem_pair(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate and its key, as PEM files: (cert path, key path)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"backplane_tls_cert": "c.pem"},
            "setting backplane_tls_cert needs backplane_tls_key",
        ),
        ({"backplane_tls_key": "k.pem"}, "setting backplane_tls_key needs backplane_tls_cert"),
        (
            {"backplane": "redis://10.0.0.5:6379/", "backplane_tls_ca": "ca.pem"},
            (
                "setting backplane_tls_ca is for TLS, but backplane is a redis:// URL "
                r"\(plain TCP\): use rediss:// for TLS"
            ),
        ),
        (
            {
                "backplane": "redis://10.0.0.5/",
                "backplane_tls_cert": "c.pem",
                "backplane_tls_key": "k.pem",
            },
            "setting backplane_tls_cert is for TLS, .* use rediss://",
        ),
    ],
)
def test_the_backplane_tls_settings_must_make_sense(values, message):
    with pytest.raises(ConfigError, match=message):
        Settings(**values)


def test_the_backplane_tls_settings_go_with_a_rediss_url_or_no_backplane():
    files = {"backplane_tls_ca": "ca.pem", "backplane_tls_cert": "c.pem", "backplane_tls_key": "k"}
    assert Settings(backplane="rediss://10.0.0.5:6380/", **files).backplane_tls_ca == "ca.pem"
    assert Settings(**files).backplane == ""  # unused without a backplane, as backplane_prefix


def test_the_backplane_tls_files_are_read_and_checked_at_start_up(tmp_path):
    from twisted.internet.ssl import PrivateCertificate

    ca, _ = _pem_pair(tmp_path, "ca")
    cert, key = _pem_pair(tmp_path, "node")
    _, other_key = _pem_pair(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    url = "rediss://127.0.0.1:6380/"

    def tls(**values: str):
        return backplane_tls(Settings(backplane=url, **values))

    assert tls() == BackplaneTLS(None, None)  # the system's trust store, no certificate
    loaded = tls(backplane_tls_ca=ca, backplane_tls_cert=cert, backplane_tls_key=key)
    assert loaded.trust_root is not None
    assert isinstance(loaded.client_certificate, PrivateCertificate)
    # A bundle of several CAs loads too.
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(Path(ca).read_text() + Path(cert).read_text())
    assert tls(backplane_tls_ca=str(bundle)).trust_root is not None
    absent = str(tmp_path / "absent.pem")
    for values, message in [
        ({"backplane_tls_ca": absent}, f"setting backplane_tls_ca: cannot read {absent}: "),
        ({"backplane_tls_ca": key}, f"setting backplane_tls_ca: {key} holds no PEM certificate"),
        ({"backplane_tls_ca": str(garbage)}, "setting backplane_tls_ca: .* holds no PEM"),
        (
            {"backplane_tls_cert": absent, "backplane_tls_key": key},
            "setting backplane_tls_cert: cannot read",
        ),
        (
            {"backplane_tls_cert": cert, "backplane_tls_key": absent},
            "setting backplane_tls_key: cannot read",
        ),
        (
            {"backplane_tls_cert": key, "backplane_tls_key": key},
            f"setting backplane_tls_cert: {key} holds no PEM certificate",
        ),
        (
            {"backplane_tls_cert": cert, "backplane_tls_key": cert},
            f"setting backplane_tls_key: {cert} holds no unencrypted PEM private key",
        ),
        (
            {"backplane_tls_cert": cert, "backplane_tls_key": other_key},
            f"setting backplane_tls_key: {other_key} is not the key of the certificate in {cert}",
        ),
    ]:
        with pytest.raises(ConfigError, match=message) as raised:
            tls(**values)
        assert "\n" not in str(raised.value)


def test_make_service_gives_the_backplane_tls_from_the_settings(tmp_path):
    ca, _ = _pem_pair(tmp_path, "ca")
    cert, key = _pem_pair(tmp_path, "node")
    service = make_service(
        Settings(
            backplane="rediss://node:pw@127.0.0.1:6380/",
            backplane_tls_ca=ca,
            backplane_tls_cert=cert,
            backplane_tls_key=key,
        )
    )
    assert service.backplane.tls is not None
    assert service.backplane.url == "rediss://node@127.0.0.1:6380/"
    assert make_service(Settings(backplane="redis://127.0.0.1:6379/")).backplane.tls is None
    with pytest.raises(ConfigError, match="setting backplane_tls_ca: cannot read"):
        make_service(
            Settings(backplane="rediss://127.0.0.1:6380/", backplane_tls_ca=str(tmp_path / "x"))
        )
