"""agent.config: TOML -> frozen Config, and one clear error per mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.config import Config, TLSConfig, load_config, parse_config, parse_listen_address
from agent.errors import ConfigError


def test_defaults() -> None:
    config = parse_config("")
    assert config.units == ()
    assert config.unit_patterns == ()
    assert config.discover_gunicorn is True
    assert config.listen_address == ":9410"
    assert (config.min_interval_seconds, config.probe_timeout_seconds,
            config.db_timeout_seconds, config.journal_window_seconds) == (30, 20, 5, 3600)
    assert config.state_dir == "/var/lib/driftwatch"
    assert config.tls == TLSConfig() and not config.tls.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.units = ()  # type: ignore[misc]


def test_full_file() -> None:
    config = parse_config("""
[agent]
units = ["app.service", "api.service"]
unit_patterns = ["web-*.service"]
discover_gunicorn = false
listen_address = "127.0.0.1:9500"
min_interval_seconds = 10
probe_timeout_seconds = 7.5
db_timeout_seconds = 2
journal_window_seconds = 600
state_dir = "/tmp/dw"
log_level = "DEBUG"

[tls]
cert_file = "/etc/driftwatch/tls.crt"
key_file = "/etc/driftwatch/tls.key"
client_ca_file = "/etc/driftwatch/ca.crt"
""", "agent.toml")
    assert config.units == ("app.service", "api.service")
    assert config.unit_patterns == ("web-*.service",)
    assert config.discover_gunicorn is False
    assert config.min_interval_seconds == 10 and config.probe_timeout_seconds == 7.5
    assert config.log_level == "debug"
    assert config.tls.enabled and config.tls.client_ca_file == "/etc/driftwatch/ca.crt"
    assert config.source == "agent.toml"


def test_unknown_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[agent]\nlisten_adress = ":9410"\n', "agent.toml")
    assert str(err.value) == ("agent.toml: unknown key 'listen_adress' in [agent] "
                              "(did you mean 'listen_address'?)")


def test_unknown_table() -> None:
    with pytest.raises(ConfigError, match=r"agent.toml: unknown table or key 'agnet'.*did you mean 'agent'"):
        parse_config('[agnet]\nunits = []\n', "agent.toml")


@pytest.mark.parametrize("text, fragment", [
    ('[agent]\nmin_interval_seconds = "30"', "'min_interval_seconds' in [agent] must be a number"),
    ('[agent]\nmin_interval_seconds = true', "'min_interval_seconds' in [agent] must be a number"),
    ('[agent]\ndiscover_gunicorn = 1', "'discover_gunicorn' in [agent] must be true or false"),
    ('[agent]\nunits = "gunicorn.service"', "'units' in [agent] must be a list of strings"),
    ('[agent]\nunits = [1]', "'units' in [agent] must be a list of strings"),
    ('[agent]\nlisten_address = 9410', "'listen_address' in [agent] must be a string"),
    ('[agent]\nlisten_address = "9410"', "invalid listen address '9410'"),
    ('[agent]\nlisten_address = "::1:9410"', "put IPv6 addresses in brackets"),
    ('[agent]\nprobe_timeout_seconds = 0', "'probe_timeout_seconds' must be positive"),
    ('[agent]\nlog_level = "loud"', "'log_level' must be one of"),
    ('[tls]\ncert_file = "/x.crt"', "[tls] needs both 'cert_file' and 'key_file'"),
    ('[tls]\nclient_ca_file = "/ca.crt"', "'client_ca_file' needs 'cert_file'"),
    ('[tls]\ncertfile = "/x"', "unknown key 'certfile' in [tls] (did you mean 'cert_file'?)"),
    ('[agent\n', "not valid TOML"),
    ('agent = 1', "[agent] must be a table"),
])
def test_bad_values(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "/etc/driftwatch/agent.toml")
    message = str(err.value)
    assert message.startswith("/etc/driftwatch/agent.toml: ")
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    (":9410", ("", 9410)),
    ("127.0.0.1:9410", ("127.0.0.1", 9410)),
    ("[::1]:9410", ("::1", 9410)),
    ("[::]:0", ("::", 0)),
    ("localhost:80", ("localhost", 80)),
])
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "9410", ":", ":99999", "[::1:9410", "[zz]:1", "::1:9410"])
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_address(text)


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr("agent.config.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert load_config() == Config()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.toml"))


def test_load_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nunits = ["a.service"]\n')
    config = load_config(str(path))
    assert config.units == ("a.service",) and config.source == str(path)
    path.write_text('[agent]\nunitz = []\n')
    with pytest.raises(ConfigError, match=f"^{path}: unknown key 'unitz'"):
        load_config(str(path))


def test_overrides_are_validated() -> None:
    config = Config().with_overrides(listen_address="127.0.0.1:1234", log_level=None)
    assert config.listen_address == "127.0.0.1:1234" and config.log_level == "info"
    with pytest.raises(ConfigError, match="invalid listen address"):
        Config().with_overrides(listen_address="nope")
