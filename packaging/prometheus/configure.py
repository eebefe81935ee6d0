#!/usr/bin/env python3
"""Render driftwatch-alerts.yml for another setup, as a monitoring mixin's _config does.

    python3 configure.py --set selector='job="apps"' --set hold=2h > my-driftwatch-alerts.yml
    python3 configure.py --for '*=30s' --set journal_window=20s   # shortened, for tests

Only the _config values (listed in the file's header) and `for:` durations change; every
expression keeps its shape, so the promtool tests of the shipped file speak for the result.
Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

RULES = Path(__file__).with_name("driftwatch-alerts.yml")
KEYS = ("selector", "hold", "journal_window", "journal_threshold", "runbook")
_HEADER = re.compile(r"^#   (" + "|".join(KEYS) + r")( +)(\S+)", re.MULTILINE)
_DURATION = re.compile(r"\d+(ms|s|m|h|d|w|y)")


class ConfigError(ValueError):
    """A value that would not give valid rules."""


def defaults(text: str) -> dict[str, str]:
    """Pure: the _config values the rules text was rendered with (from its header)."""
    found = {m.group(1): m.group(3) for m in _HEADER.finditer(text)}
    missing = set(KEYS) - set(found)
    if missing:
        raise ConfigError(f"the rules header lacks _config keys: {', '.join(sorted(missing))}")
    return found


def validate(key: str, value: str) -> None:
    """Refuse a value that would break the rules, naming the key."""
    if key not in KEYS:
        raise ConfigError(f"unknown _config key {key!r} (known: {', '.join(KEYS)})")
    if key in ("hold", "journal_window") and not _DURATION.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a Prometheus duration such as 5m")
    if key == "journal_threshold" and not re.fullmatch(r"\d+(\.\d+)?", value):
        raise ConfigError(f"{key}: {value!r} is not a number")
    if key == "selector" and (not re.fullmatch(r'[a-zA-Z_]\w*(=|!=|=~|!~)"[^"\\`\s]*"'
                                               r'(,[a-zA-Z_]\w*(=|!=|=~|!~)"[^"\\`\s]*")*', value)):
        raise ConfigError(f"{key}: {value!r} is not a label matcher list such as job=\"apps\"")
    if key == "runbook" and (not re.fullmatch(r"https?://\S+", value) or "#" in value):
        raise ConfigError(f"{key}: {value!r} is not an http(s) URL without a #fragment")


def render(text: str, values: Mapping[str, str] | None = None,
           durations: Mapping[str, str] | None = None) -> str:
    """Pure: the rules text with new _config values and `for:` durations (alert or '*')."""
    old = defaults(text)
    new = {**old, **(values or {})}
    for key, value in new.items():
        validate(key, value)
    for pattern, key in (
            (r"(last_over_time\([^\[\n]*)\[{}\]", "hold"),
            (r"(increase\(driftwatch_journal_schema_errors_total\{{[^}}\n]*\}})\[{}\]",
             "journal_window")):
        text = re.sub(pattern.format(re.escape(old[key])), rf"\g<1>[{new[key]}]", text)
    text = re.sub(r"(driftwatch_journal_schema_errors_total[^\n]*\) >= )"
                  + re.escape(old["journal_threshold"]) + r"\b",
                  rf"\g<1>{new['journal_threshold']}", text)
    text = text.replace(old["selector"], new["selector"])
    text = text.replace(old["runbook"] + "#", new["runbook"] + "#")
    text = _HEADER.sub(lambda m: f"#   {m.group(1)}{m.group(2)}{new[m.group(1)]}", text)
    for alert, duration in (durations or {}).items():
        if not _DURATION.fullmatch(duration):
            raise ConfigError(f"for {alert}: {duration!r} is not a Prometheus duration")
        name = r"\S+" if alert == "*" else re.escape(alert)
        text, count = re.subn(rf"(- alert: {name}\n(?:(?!\s*- alert:).*\n)*?\s*for: )\S+",
                              rf"\g<1>{duration}", text)
        if not count:
            raise ConfigError(f"no alert named {alert!r}")
    return text


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the rendered rules (or write them with -o)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=Path, default=RULES, help="rules to render from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a _config value ({', '.join(KEYS)})")
    parser.add_argument("--for", dest="durations", action="append", default=[],
                        metavar="ALERT=DURATION", help="a for: duration ('*' for every alert)")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        out = render(args.rules.read_text(), _pairs(args.set, "--set"),
                     _pairs(args.durations, "--for"))
    except (ConfigError, OSError) as exc:
        print(f"configure.py: {exc}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(out)
    else:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
