"""--web.config.file: the Prometheus exporter-toolkit web configuration (TLS, basic auth,
response headers), read the way exporter-toolkit reads it, plus the bcrypt check of a request."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

# exporter-toolkit's own allow-list (web/handler.go extraHTTPHeaders): name -> allowed values
# (empty: any value). Private there "to ensure consistency in the Prometheus ecosystem".
EXTRA_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# Go's tls.ClientAuthType names -> what Python's ssl can do. Python verifies every client
# certificate it asks for, so the two "ask but do not verify" policies cannot be offered.
CLIENT_AUTH = {"": ssl.CERT_NONE, "NoClientCert": ssl.CERT_NONE,
               "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
             "client_ca_file", "client_allowed_sans", "min_version", "max_version",
             "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")
_HTTP_KEYS = ("http2", "headers")
_BCRYPT = re.compile(r"^\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}$")
HTPASSWD_HINT = "make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"


@dataclass(frozen=True)
class WebTLS:
    """The server side of TLS: certificate, key, and who must show a client certificate."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    @property
    def verifies_clients(self) -> bool:
        """True when a client certificate, if shown, is verified against the CA."""
        return CLIENT_AUTH[self.client_auth_type] != ssl.CERT_NONE


@dataclass(frozen=True)
class WebConfig:
    """Everything --web.config.file says; the default is plain HTTP without authentication."""

    tls: WebTLS | None = None
    users: tuple[tuple[str, str], ...] = ()       # (user, bcrypt hash)
    headers: tuple[tuple[str, str], ...] = ()     # extra response headers
    source: str = ""

    @property
    def auth_required(self) -> bool:
        """exporter-toolkit: with basic_auth_users, every request needs valid credentials."""
        return bool(self.users)


def _table(value: Any, name: str, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{name}' must be a mapping")
    for key in value:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key '{key}' in '{name}' (exporter-toolkit's "
                              f"web config knows: {', '.join(keys)})")
    return value


def _string(table: dict[str, Any], key: str, section: str, where: str) -> str:
    value = table.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' in '{section}' must be a string")
    return value


def _join(base_dir: str, path: str) -> str:
    """exporter-toolkit's SetDirectory: relative paths are relative to the config file."""
    return path if not path or os.path.isabs(path) else os.path.join(base_dir, path)


def _parse_tls(table: dict[str, Any], where: str, base_dir: str) -> WebTLS | None:
    section = "tls_server_config"
    for inline in ("cert", "key", "client_ca"):
        if table.get(inline):
            raise ConfigError(f"{where}: inline '{inline}' in '{section}' is not supported by "
                              f"driftwatch: put it in a file and use '{inline}_file'")
    for unsupported in ("cipher_suites", "curve_preferences"):
        if table.get(unsupported):
            raise ConfigError(f"{where}: '{unsupported}' in '{section}' is not supported by "
                              "driftwatch (OpenSSL's defaults for TLS 1.2 and 1.3 apply)")
    s = {k: _string(table, k, section, where) for k in
         ("cert_file", "key_file", "client_ca_file", "client_auth_type")}
    if not any(s.values()):
        return None   # exporter-toolkit: no TLS setting at all means plain HTTP
    if not s["cert_file"]:
        raise ConfigError(f"{where}: missing one of cert or cert_file in '{section}'")
    if not s["key_file"]:
        raise ConfigError(f"{where}: missing one of key or key_file in '{section}'")
    auth = s["client_auth_type"]
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise ConfigError(f"{where}: client_auth_type {auth} is not supported by driftwatch "
                          "(it would accept unverified certificates): use "
                          "RequireAndVerifyClientCert or VerifyClientCertIfGiven")
    if auth not in CLIENT_AUTH:
        raise ConfigError(f"{where}: invalid ClientAuth: {auth} (one of "
                          f"{', '.join(k for k in CLIENT_AUTH if k)})")
    if s["client_ca_file"] and CLIENT_AUTH[auth] == ssl.CERT_NONE:
        raise ConfigError(f"{where}: client CA's have been configured without a Client Auth "
                          "Policy (set client_auth_type: RequireAndVerifyClientCert)")
    sans = table.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(x, str) for x in sans):
        raise ConfigError(f"{where}: 'client_allowed_sans' must be a list of strings")
    if sans and CLIENT_AUTH[auth] != ssl.CERT_REQUIRED:
        raise ConfigError(f"{where}: client_allowed_sans requires client_auth_type "
                          "RequireAndVerifyClientCert")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = _string(table, key, section, where) or default
        if value not in TLS_VERSIONS:
            raise ConfigError(f"{where}: unknown TLS version: {value} (one of "
                              f"{', '.join(TLS_VERSIONS)})")
        versions[key] = value
    return WebTLS(_join(base_dir, s["cert_file"]), _join(base_dir, s["key_file"]),
                  _join(base_dir, s["client_ca_file"]), auth or "NoClientCert", tuple(sans),
                  **versions)


def _parse_users(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'basic_auth_users' must be a mapping of user: bcrypt hash")
    users = []
    for user, hashed in value.items():
        if not isinstance(user, str) or not user:
            raise ConfigError(f"{where}: 'basic_auth_users' has an empty or non-string user")
        match = _BCRYPT.match(hashed) if isinstance(hashed, str) else None
        if match is None:
            # Never echo the value: it may be a plain password pasted by mistake.
            raise ConfigError(f"{where}: basic_auth_users: the password of user {user!r} is not "
                              f"a bcrypt hash ({HTPASSWD_HINT})")
        if not 4 <= int(match.group(1)) <= 31:
            raise ConfigError(f"{where}: basic_auth_users: the bcrypt cost of user {user!r} is "
                              "out of range (4-31)")
        users.append((user, hashed))
    return tuple(users)


def _parse_headers(table: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    headers = table.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{where}: 'headers' in 'http_server_config' must be a mapping")
    out = []
    for name, value in headers.items():
        if name not in EXTRA_HEADERS:
            raise ConfigError(f"{where}: HTTP header {name!r} can not be configured (one of "
                              f"{', '.join(EXTRA_HEADERS)})")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise ConfigError(f"{where}: the value of header {name} must be a one-line string")
        allowed = EXTRA_HEADERS[name]
        if allowed and value not in allowed:
            raise ConfigError(f"{where}: invalid value for {name}. Expected one of: "
                              f"{list(allowed)}, but got: {value!r}")
        if value:   # "Unset if blank"
            out.append((name, value))
    return tuple(out)


def parse_web_config(text: str, where: str = "<web config>", base_dir: str = ".") -> WebConfig:
    """Pure: exporter-toolkit YAML -> WebConfig; every mistake is one ConfigError naming it."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    data = _table(data, "the top level", _TOP_KEYS, where)
    rate = _table(data.get("rate_limit"), "rate_limit", ("interval", "burst"), where)
    if rate.get("interval") not in (None, 0, "0", "0s"):
        raise ConfigError(f"{where}: 'rate_limit' is not supported by driftwatch (its own "
                          "connection cap and request deadline apply; see max_connections)")
    tls = _parse_tls(_table(data.get("tls_server_config"), "tls_server_config", _TLS_KEYS,
                            where), where, base_dir)
    http = _table(data.get("http_server_config"), "http_server_config", _HTTP_KEYS, where)
    if not isinstance(http.get("http2", True), bool):
        raise ConfigError(f"{where}: 'http2' in 'http_server_config' must be true or false")
    return WebConfig(tls=tls, users=_parse_users(data.get("basic_auth_users"), where),
                     headers=_parse_headers(http, where), source=where)


def load_web_config(path: str | None) -> WebConfig:
    """Read PATH ('' or None: plain HTTP, no authentication) and check its TLS files load."""
    if not path:
        return WebConfig()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read web config file: {exc}") from None
    config = parse_web_config(text, path, os.path.dirname(os.path.abspath(path)))
    if config.tls is not None:
        make_ssl_context(config.tls)   # the files must load now, not at the first scrape
    return config


def make_ssl_context(tls: WebTLS) -> ssl.SSLContext:
    """Server TLS context for TLS; ConfigError naming the files when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        context.verify_mode = CLIENT_AUTH[tls.client_auth_type]
        if tls.client_ca_file:
            context.load_verify_locations(cafile=tls.client_ca_file)
        elif tls.verifies_clients:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)   # Go: the system roots
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f for f in (tls.cert_file, tls.key_file, tls.client_ca_file) if f)
        raise ConfigError(f"TLS setup failed ({files}): {exc}") from None
    return context


def peer_san_allowed(cert: dict[str, Any] | None, allowed: tuple[str, ...]) -> bool:
    """exporter-toolkit's client_allowed_sans: some SAN of the verified client cert matches."""
    if not allowed:
        return True
    if not cert:
        return False
    values = [v for _, v in cert.get("subjectAltName", ())]
    return any(v.rstrip("\n") in allowed for v in values)


class BasicAuth:
    """Checks 'Authorization: Basic' against bcrypt hashes, as exporter-toolkit does: a fixed
    hash for unknown users (no user enumeration by timing), one bcrypt at a time, results
    cached (keyed by a digest, never the password itself)."""

    CACHE_SIZE = 256

    def __init__(self, users: tuple[tuple[str, str], ...]) -> None:
        self._users = dict(users)
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._dummy: bytes | None = None

    def _dummy_hash(self) -> bytes:
        import bcrypt
        if self._dummy is None:
            self._dummy = bcrypt.hashpw(b"driftwatch-not-a-user", bcrypt.gensalt(10))
        return self._dummy

    def check(self, authorization: str | None) -> str | None:
        """The authenticated user name, or None."""
        creds = parse_basic(authorization)
        if creds is None:
            return None
        user, password = creds
        known = user in self._users
        hashed = self._users[user].encode() if known else self._dummy_hash()
        key = hashlib.sha256(b"\0".join((user.encode(), hashed, password))).digest()
        with self._lock:
            ok = self._cache.get(key)
        if ok is None:
            import bcrypt
            with self._bcrypt_lock:   # CPU-heavy: one at a time, like exporter-toolkit
                try:
                    ok = bcrypt.checkpw(password, hashed)
                except ValueError:    # e.g. a password longer than bcrypt's 72 bytes
                    ok = False
            with self._lock:
                self._cache[key] = ok
                while len(self._cache) > self.CACHE_SIZE:
                    self._cache.popitem(last=False)
        return user if ok and known else None


def parse_basic(authorization: str | None) -> tuple[str, bytes] | None:
    """'Basic base64(user:password)' -> (user, password); None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None

