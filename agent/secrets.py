"""Pure: masking of secrets in environment values, database URLs, conninfo strings and argv."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable
from urllib.parse import quote, unquote

MASK = "****"
# Names whose values are secrets whatever they look like.
SECRET_NAME = re.compile(
    r"(^|_)(PASS(WORD|WD|PHRASE)?|PWD|SECRETS?|TOKENS?|API_?KEYS?|ACCESS_?KEY|PRIVATE_?KEY|"
    r"SECRET_?KEY|CREDENTIALS?|AUTH|SALT|SIGNING_?KEY|SESSION_?KEY|DSN)(_|$)",
    re.IGNORECASE,
)
# PGPASSWORD, MYSQL_PWD-style glued names.
SECRET_SUFFIX = re.compile(r"(PASSWORD|PASSWD|SECRET)$", re.IGNORECASE)
# user:password@ inside any URL-looking string. The password runs to the LAST '@' of the
# token: libpq and SQLAlchemy split at the first '@', so an unencoded '@' in a password
# makes the rest look like part of the host; masking up to the last '@' hides it either way.
# An empty user (redis://:pw@h) is allowed.
URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>\S*)(?=@)")
# ?password=... or &sslpassword=... query parameters (any case): up to the next '&'.
QUERY_PASSWORD = re.compile(
    r"(?P<head>[?&](?P<name>[A-Za-z_][\w.\-]*)=)(?P<pw>[^&\s]*)")
# NAME=VALUE where NAME is secret-looking: libpq conninfo (password = 'a b'), shell
# assignments, gunicorn -e values, log lines. Quoted values may hold spaces and escapes;
# an unclosed quote runs to the end, as libpq and the shell read it.
ASSIGNMENT = re.compile(
    r"(?<![\w.\-?&])(?P<head>(?P<name>[A-Za-z_][\w.\-]*)\s*=\s*)"
    # Unquoted: libpq reads a backslash as an escape there too (password=a\ b is "a b").
    r"(?P<pw>'(?:[^'\\]|\\.)*(?:'|\\?$)|\"(?:[^\"\\]|\\.)*(?:\"|\\?$)"
    r"|(?:[^\s'\"\\]|\\.)(?:[^\s\\]|\\.)*\\?)",
    re.DOTALL)


def is_secret_name(name: str) -> bool:
    """True for variable names that by convention hold secrets (PASSWORD, SECRET_KEY, ...)."""
    return bool(SECRET_NAME.search(name) or SECRET_SUFFIX.search(name))


def _mask_quoted(value: str) -> str:
    # Keep the quotes so the shape stays readable: password='****'.
    if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
        return value[0] + MASK + value[0]
    return MASK


def mask_url(text: str) -> str:
    """Mask every password in TEXT: URL userinfo, secret query parameters, NAME=VALUE
    conninfo and assignments with secret-looking names; the real parsers double-check."""
    masked = URL_PASSWORD.sub(
        lambda m: m.group("head") + MASK if m.group("pw") else m.group(0), text)
    masked = QUERY_PASSWORD.sub(
        lambda m: m.group("head") + MASK if is_secret_name(m.group("name")) and m.group("pw")
        else m.group(0), masked)
    masked = ASSIGNMENT.sub(
        lambda m: m.group("head") + _mask_quoted(m.group("pw"))
        if is_secret_name(m.group("name")) else m.group(0), masked)
    return _mask_parsed(text, masked)


# NAME=value in free text (log lines, error messages).
_ASSIGNMENT = re.compile(r"\b(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\s&;,'\"]+)")


def mask_text(text: str) -> str:
    """Mask URL passwords and values of secret-looking NAME=value pairs in free text."""
    text = mask_url(text)
    return _ASSIGNMENT.sub(lambda m: f"{m.group('name')}={MASK}"
                           if is_secret_name(m.group("name")) else m.group(0), text)


def _mask_parsed(original: str, masked: str) -> str:
    """Whatever password SQLAlchemy's or libpq's own parser finds in ORIGINAL, gone from
    MASKED too (raw and percent-encoded): the regexes above are the fast path, this the net."""
    for secret in _parsed_passwords(original):
        for form in dict.fromkeys((secret, quote(secret, safe=""), quote(secret))):
            if form in masked:
                # Whole words only: a password "p" must not eat the p of "postgresql".
                masked = re.sub(r"(?<![A-Za-z0-9])" + re.escape(form) + r"(?![A-Za-z0-9])",
                                MASK, masked)
    return masked


# A libpq conninfo key and its '=' (libpq allows spaces around it).
_CONNINFO_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _parsed_passwords(text: str) -> Iterable[str]:
    """Passwords the real parsers read from TEXT (a URL or a libpq conninfo string)."""
    if "=" not in text and "://" not in text:
        return []
    found: list[str] = []
    if "://" in text and "@" in text:
        try:
            from agent.dburl import make_url

            url = make_url(text.strip())
            if url.password:
                found.append(str(url.password))
            found += [str(v) for k, v in url.query.items()
                      if is_secret_name(k) and isinstance(v, str)]
        except Exception:  # not a URL SQLAlchemy accepts: nothing to add
            pass
    if "://" in text or not any(is_secret_name(m.group(1)) for m in _CONNINFO_KEY.finditer(text)):
        # libpq finds a secret only as the value of a secret-named key ("password = x"); a
        # URI's password is where the grammar above and URL_PASSWORD (to the last '@', which
        # covers libpq's first '@') find it (tests/unit/test_masking.py checks both against
        # libpq). So psycopg2 (libpq, OpenSSL: ~10 MiB) is imported only for such a conninfo.
        return [f for f in dict.fromkeys(found + [unquote(f) for f in found]) if f and f != MASK]
    try:
        from psycopg2.extensions import parse_dsn  # libpq's own PQconninfoParse

        parsed = parse_dsn(text.strip())
        found += [v for k, v in parsed.items() if is_secret_name(k) and v]
    except Exception:  # not a conninfo libpq accepts (or psycopg2 missing): nothing to add
        pass
    found += [unquote(f) for f in found]
    return [f for f in dict.fromkeys(found) if f and f != MASK]


def mask_value(name: str, value: str) -> str:
    """The value to show for NAME: fully masked for secret names (whatever the value, URLs
    included: a Sentry DSN's key sits in the user part), passwords masked otherwise."""
    if is_secret_name(name):
        return MASK if value else value
    return mask_url(value)


def mask_environment(env: dict[str, str]) -> dict[str, str]:
    """A copy of env with every secret masked."""
    return {name: mask_value(name, value) for name, value in env.items()}


def _mask_env_argument(assignment: str) -> str:
    """gunicorn -e / env(1) 'NAME=VALUE' -> the value masked by NAME."""
    name, sep, value = assignment.partition("=")
    if not sep:
        return mask_url(assignment)
    return f"{name}={mask_value(name, value)}"


SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}


def _mask_script(script: str) -> str:
    """A 'sh -c' script with its words masked as argv (quoted values whole), else as text."""
    try:
        words = shlex.split(script, comments=False)
    except ValueError:  # unbalanced quotes: mask it as plain text
        return mask_url(script)
    masked = mask_argv(words)
    return shlex.join(masked) if masked != words else mask_url(script)


def mask_argv(argv: Iterable[str]) -> list[str]:
    """A command line with every secret masked: gunicorn -e/--env values, NAME=VALUE words,
    URLs and conninfo strings anywhere (shell scripts of 'sh -c' included)."""
    argv = list(argv)
    shell = bool(argv) and posixpath.basename(argv[0]) in SHELLS
    out: list[str] = []
    after_env_flag = False
    for i, arg in enumerate(argv):
        if shell and i > 0 and argv[i - 1] == "-c":
            out.append(_mask_script(arg))
        elif after_env_flag:
            out.append(_mask_env_argument(arg))
            after_env_flag = False
        elif arg in ("-e", "--env"):
            out.append(arg)
            after_env_flag = True
        elif arg.startswith("--env="):
            out.append("--env=" + _mask_env_argument(arg[len("--env="):]))
        elif arg.startswith("-e") and not arg.startswith("--") and "=" in arg:
            out.append("-e" + _mask_env_argument(arg[2:]))
        else:
            out.append(mask_url(arg))
    return out
