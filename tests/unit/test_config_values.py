"""Config values: non-finite, negative, out-of-range and wrong-typed numbers are refused with
the key named, in agent.toml, in overrides and on agentctl's command line."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import MAX_SECONDS, Config, parse_config, seconds_argument
from agent.errors import ConfigError

NUMBER_KEYS = ["min_interval_seconds", "probe_timeout_seconds", "db_timeout_seconds",
               "journal_window_seconds"]
WHERE = "/etc/driftwatch/agent.toml"


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, WHERE)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: ") and "\n" not in message
    return message


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("value", ["inf", "+inf", "-inf", "nan", "-nan"])
def test_non_finite_numbers_refused_with_the_key(key: str, value: str) -> None:
    message = refused(f"[agent]\n{key} = {value}")
    assert f"'{key}'" in message and "finite" in message


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("value", ["-1", "-0.001", "-1e9"])
def test_negative_numbers_refused(key: str, value: str) -> None:
    assert f"'{key}'" in refused(f"[agent]\n{key} = {value}")


@pytest.mark.parametrize("key", NUMBER_KEYS)
def test_absurdly_large_numbers_refused(key: str) -> None:
    message = refused(f"[agent]\n{key} = 1e12")
    assert f"'{key}'" in message and "at most" in message


@pytest.mark.parametrize("key", ["probe_timeout_seconds", "db_timeout_seconds",
                                 "journal_window_seconds"])
def test_zero_timeouts_refused(key: str) -> None:
    assert f"'{key}' must be positive" in refused(f"[agent]\n{key} = 0")


def test_zero_interval_allowed_and_ranges_kept() -> None:
    config = parse_config("[agent]\nmin_interval_seconds = 0\nprobe_timeout_seconds = 0.5\n"
                          f"db_timeout_seconds = {MAX_SECONDS}")
    assert config.min_interval_seconds == 0 and config.probe_timeout_seconds == 0.5
    assert config.db_timeout_seconds == MAX_SECONDS


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 0.0])
def test_overrides_are_validated(value: float) -> None:
    with pytest.raises(ConfigError, match="'probe_timeout_seconds'"):
        Config().with_overrides(probe_timeout_seconds=value)


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0", "-0.5", "abc", "1e12", ""])
def test_command_line_seconds_refused(text: str) -> None:
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        seconds_argument(text)


@pytest.mark.parametrize(("text", "value"), [("5", 5.0), ("0.25", 0.25), ("20", 20.0)])
def test_command_line_seconds_accepted(text: str, value: float) -> None:
    assert seconds_argument(text) == value


@pytest.mark.parametrize("flag", ["--probe-timeout", "--db-timeout"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
def test_agentctl_refuses_bad_timeouts(flag: str, value: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import build_parser
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["check", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@given(key=st.sampled_from(NUMBER_KEYS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(min_value=-10**15, max_value=10**15)))
def test_generated_numbers_are_accepted_only_in_range(key: str, value: float) -> None:
    text = repr(value).replace("inf", "inf").replace("nan", "nan")
    if isinstance(value, float) and math.isnan(value):
        text = "nan"
    elif isinstance(value, float) and math.isinf(value):
        text = "inf" if value > 0 else "-inf"
    ok = math.isfinite(value) and 0 <= value <= MAX_SECONDS and (
        value > 0 or key == "min_interval_seconds")
    if ok:
        assert getattr(parse_config(f"[agent]\n{key} = {text}"), key) == value
    else:
        with pytest.raises(ConfigError, match=f"'{key}'"):
            parse_config(f"[agent]\n{key} = {text}")


@given(key=st.sampled_from(NUMBER_KEYS + ["units", "listen_address", "log_level",
                                          "discover_gunicorn", "state_dir"]),
       value=st.sampled_from(['"5"', "true", "[1]", "{a = 1}", "1979-05-27", '""']))
def test_generated_wrong_types_name_the_key(key: str, value: str) -> None:
    text = f"[agent]\n{key} = {value}"
    try:
        parse_config(text)
    except ConfigError as exc:
        assert f"'{key}'" in str(exc) or "listen address" in str(exc)
    else:
        # Only a value of the right type gets through.
        assert (key, value) == ("discover_gunicorn", "true"), (key, value)


def test_messages_in_full() -> None:
    assert refused("[agent]\nprobe_timeout_seconds = inf") == (
        f"{WHERE}: 'probe_timeout_seconds' must be a finite number of seconds, not inf")
    assert refused("[agent]\nmin_interval_seconds = -1") == (
        f"{WHERE}: 'min_interval_seconds' must not be negative")
    assert refused("[agent]\ndb_timeout_seconds = -1") == (
        f"{WHERE}: 'db_timeout_seconds' must be positive")
    assert refused("[agent]\ndb_timeout_seconds = 3e6") == (
        f"{WHERE}: 'db_timeout_seconds' must be at most 2592000 seconds (30 days), not 3000000.0")
    assert refused('[agent]\nlog_level = "loud"') == (
        f"{WHERE}: 'log_level' must be one of debug, info, warning, error, not 'loud'")
    assert refused("[agnet]\n") == (
        f"{WHERE}: unknown table or key 'agnet' at top level (did you mean 'agent'?); "
        "expected [agent] and optionally [tls]")
    assert refused('[agent]\nstate_dir = "x"') == (
        f"{WHERE}: 'state_dir' must be an absolute path, not 'x'")
    assert refused('[agent]\nunits = "a"') == (
        f"{WHERE}: 'units' in [agent] must be a list of strings, not str 'a'")
    assert refused("[agent]\nzzz = 1") == f"{WHERE}: unknown key 'zzz' in [agent]"


def test_seconds_problem_in_full() -> None:
    from agent.config import seconds_problem
    assert seconds_problem(True) == "must be a number of seconds, not bool True"
    assert seconds_problem("5") == "must be a number of seconds, not str '5'"
    assert seconds_problem(5) == "" and seconds_problem(0, zero_ok=True) == ""
    assert seconds_problem(-1, zero_ok=True) == "must not be negative"


def test_command_line_messages() -> None:
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="^not a number of seconds: 'x'$"):
        seconds_argument("x")
    with pytest.raises(argparse.ArgumentTypeError, match="^'-1': must be positive$"):
        seconds_argument("-1")


def test_override_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match="^command line: 'db_timeout_seconds' must be"):
        Config().with_overrides(db_timeout_seconds=-1)
    assert Config().with_overrides(db_timeout_seconds=None).db_timeout_seconds == 5.0


@pytest.mark.parametrize(("text", "message"), [
    ("9410", "invalid listen address '9410': expected [HOST]:PORT, e.g. ':9410', "
             "'127.0.0.1:9410' or '[::1]:9410'"),
    ("[zz]:1", "invalid listen address '[zz]:1': 'zz' is not an IPv6 address"),
    ("::1:80", "invalid listen address '::1:80': put IPv6 addresses in brackets, e.g. "
               "'[::1]:9410'"),
    (":65536", "invalid listen address ':65536': expected [HOST]:PORT, e.g. ':9410', "
               "'127.0.0.1:9410' or '[::1]:9410'"),
])
def test_listen_address_messages(text: str, message: str) -> None:
    from agent.config import parse_listen_address
    with pytest.raises(ValueError) as err:
        parse_listen_address(text)
    assert str(err.value) == message


def test_listen_address_port_bounds() -> None:
    from agent.config import parse_listen_address
    assert parse_listen_address(":65535") == ("", 65535)
    assert parse_listen_address(":0") == ("", 0)


def test_load_config_reads_utf8(tmp_path: object) -> None:
    from pathlib import Path

    from agent.config import load_config
    path = Path(str(tmp_path)) / "agent.toml"
    path.write_bytes('[agent]\nunits = ["caf\u00e9.service"]\n'.encode())
    assert load_config(str(path)).units == ("caf\u00e9.service",)
    path.write_bytes(b"[agent]\nunits = [\"\xff\"]\n")
    with pytest.raises(ConfigError, match=f"^{path}: cannot read config file: "):
        load_config(str(path))
