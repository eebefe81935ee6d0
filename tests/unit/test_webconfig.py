"""agent.daemon.webconfig (exporter-toolkit's web config format) and agent.daemon.redact, on literal inputs."""

from __future__ import annotations

import base64
import ssl

import bcrypt
import pytest

from agent.errors import ConfigError
from agent.daemon.redact import REDACTED, redact_status
from agent.snapshot import Snapshot
from agent.daemon.webconfig import BasicAuth, parse_basic, parse_web_config, peer_san_allowed
from tests.unit.test_metrics import SECRET, broken_unit, unknown_unit

# htpasswd -nBC 10 "" output style ($2y$), as exporter-toolkit's docs show; password "s3cret".
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


def test_full_exporter_toolkit_example() -> None:
    text = f"""
tls_server_config:
  cert_file: server.crt
  key_file: /etc/dw/server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  client_allowed_sans: ["prometheus.example"]
  min_version: TLS13
http_server_config:
  http2: false
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    Strict-Transport-Security: ""
basic_auth_users:
  prometheus: '{HASH}'
"""
    web = parse_web_config(text, "web.yml", base_dir="/etc/dw")
    assert web.tls is not None
    assert (web.tls.cert_file, web.tls.key_file, web.tls.client_ca_file) == (
        "/etc/dw/server.crt", "/etc/dw/server.key", "/etc/dw/ca.crt")   # relative to the file
    assert web.tls.verifies_clients and web.tls.min_version == "TLS13"
    assert web.tls.max_version == "TLS13" and web.tls.client_allowed_sans == (
        "prometheus.example",)
    assert web.headers == (("X-Frame-Options", "deny"), ("X-Content-Type-Options", "nosniff"))
    assert web.users == (("prometheus", HASH),) and web.auth_required


def test_empty_file_is_plain_http_without_auth() -> None:
    for text in ("", "{}\n", "tls_server_config: {}\nbasic_auth_users: {}\n"):
        web = parse_web_config(text)
        assert web.tls is None and not web.auth_required and web.headers == ()


@pytest.mark.parametrize("text, fragment", [
    ("tls_server_confg: {}", "unknown key 'tls_server_confg'"),
    ("tls_server_config: {cert_file: a.crt, keyfile: a.key}", "unknown key 'keyfile'"),
    ("tls_server_config: {key_file: a.key}", "missing one of cert or cert_file"),
    ("tls_server_config: {cert_file: a.crt}", "missing one of key or key_file"),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: Bogus}",
     "invalid ClientAuth: Bogus"),
    ("tls_server_config: {cert_file: a, key_file: b, client_ca_file: ca}",
     "client CA's have been configured without a Client Auth Policy"),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: RequireAnyClientCert}",
     "would accept unverified certificates"),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: VerifyClientCertIfGiven,"
     " client_allowed_sans: [x]}", "client_allowed_sans requires"),
    ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS14}",
     "unknown TLS version: TLS14"),
    ("tls_server_config: {cert: '-----BEGIN', key_file: b}", "inline 'cert'"),
    ("tls_server_config: {cert_file: a, key_file: b, cipher_suites: [X]}", "cipher_suites"),
    ("http_server_config: {headers: {Server: x}}", "HTTP header 'Server' can not be configured"),
    ("http_server_config: {headers: {X-Frame-Options: allow}}",
     "invalid value for X-Frame-Options"),
    ("http_server_config: {http2: maybe}", "'http2' in 'http_server_config' must be true"),
    ("rate_limit: {interval: 1s, burst: 5}", "'rate_limit' is not supported"),
    ("basic_auth_users: [alice]", "must be a mapping"),
    ("basic_auth_users: {alice: hunter2}", "the password of user 'alice' is not a bcrypt hash"),
    ("tls_server_config: [", "not valid YAML"),
])
def test_mistakes_are_one_clear_error(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_web_config(text, "web.yml")
    assert fragment in str(err.value) and str(err.value).startswith("web.yml: ")
    assert "hunter2" not in str(err.value)        # a pasted password is never echoed


def auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_like_exporter_toolkit() -> None:
    auth = BasicAuth((("prometheus", HASH),))
    assert auth.check(auth_header("prometheus", "s3cret")) == "prometheus"
    assert auth.check(auth_header("prometheus", "s3cret")) == "prometheus"   # cached
    assert auth.check(auth_header("prometheus", "wrong")) is None
    assert auth.check(auth_header("nobody", "s3cret")) is None
    assert auth.check(auth_header("prometheus", "x" * 100)) is None        # > 72 bytes
    assert auth.check(None) is None and auth.check("Bearer abc") is None
    assert auth.check("Basic !!!") is None
    assert parse_basic("basic " + base64.b64encode(b"a:b:c").decode()) == ("a", b"b:c")
    assert all(b"s3cret" not in k for k in auth._cache)                    # digests only


def test_client_allowed_sans() -> None:
    cert = {"subjectAltName": (("DNS", "prometheus.example"), ("IP Address", "127.0.0.1"))}
    assert peer_san_allowed(cert, ())
    assert peer_san_allowed(cert, ("127.0.0.1",))
    assert not peer_san_allowed(cert, ("other.example",))
    assert not peer_san_allowed(None, ("127.0.0.1",))


def test_client_auth_types_map_to_ssl() -> None:
    web = parse_web_config("tls_server_config: {cert_file: a, key_file: b, "
                           "client_auth_type: VerifyClientCertIfGiven}")
    assert web.tls is not None and web.tls.verifies_clients
    from agent.daemon.webconfig import CLIENT_AUTH
    assert CLIENT_AUTH[web.tls.client_auth_type] == ssl.CERT_OPTIONAL


def test_redacted_status_keeps_states_and_counts_drops_free_text() -> None:
    data = Snapshot(units=(broken_unit(), unknown_unit()),
                    errors=(f"discovery failed: /etc/x postgresql://u:{SECRET}@h/d",)).as_dict()
    data["agent"] = {"version": "0.1.0", "config_file": "/etc/driftwatch/agent.toml",
                     "inspections_total": 3, "last_error": "ProgrammingError: SELECT 1"}
    out = redact_status(data)
    text = repr(out)
    for secret_or_detail in (SECRET, "/etc/", "SELECT", "PGPASSWORD", "users", "fk_user",
                             "timeout", "email"):
        assert secret_or_detail not in text, secret_or_detail
    assert out["redacted"] is True and out["errors"] == [REDACTED]
    unit = out["units"][0]
    assert unit["unit"] == "app.service" and unit["database"] == "db.internal:5432/app"
    assert unit["migrations"]["pending"] == ["bbb", "ccc", "ddd"]       # as /metrics shows
    assert [i["kind"] for i in unit["schema_drift"]] == ["missing_column", "missing_column",
                                                         "extra_foreign_key"]
    assert unit["checks"][1] == {"name": "schema", "success": False, "duration_seconds": 1.5,
                                 "error": REDACTED}
    assert unit["findings"] == [{"check": "migrations", "severity": "critical",
                                 "message": REDACTED, "remedy": ""}]
    assert unit["journal_schema_errors"] == {"undefined_column": 4, "undefined_table": 1}
    assert out["agent"] == {"version": "0.1.0", "inspections_total": 3,
                            "last_error": REDACTED}
    assert out["units"][1]["unit"] == "down.service"
