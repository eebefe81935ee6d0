"""Pure: masking of secrets in environment values and database URLs."""

from __future__ import annotations

import re

MASK = "****"
# Names whose values are secrets whatever they look like.
SECRET_NAME = re.compile(
    r"(^|_)(PASS(WORD|WD|PHRASE)?|PWD|SECRETS?|TOKENS?|API_?KEYS?|ACCESS_?KEY|PRIVATE_?KEY|"
    r"SECRET_?KEY|CREDENTIALS?|AUTH|SALT|SIGNING_?KEY|SESSION_?KEY|DSN)(_|$)",
    re.IGNORECASE,
)
# PGPASSWORD, MYSQL_PWD-style glued names.
SECRET_SUFFIX = re.compile(r"(PASSWORD|PASSWD|SECRET)$", re.IGNORECASE)
# user:password@ inside any URL-looking string, e.g. postgresql://app:s3cret@db/app.
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?=@)")
# ?password=... or &sslpassword=... query parameters.
QUERY_PASSWORD = re.compile(r"(?P<head>[?&][A-Za-z_]*password=)(?P<pw>[^&\s]*)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for variable names that by convention hold secrets (PASSWORD, SECRET_KEY, ...)."""
    return bool(SECRET_NAME.search(name) or SECRET_SUFFIX.search(name))


def mask_url(text: str) -> str:
    """Replace passwords inside URLs (userinfo and query parameters) with a mask."""
    text = URL_PASSWORD.sub(lambda m: m.group("head") + MASK if m.group("pw") else m.group(0),
                            text)
    return QUERY_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def mask_value(name: str, value: str) -> str:
    """The value to show for NAME: fully masked for secret names, URL passwords masked otherwise."""
    if is_secret_name(name) and not _is_plain_url_without_password(value):
        return MASK if value else value
    return mask_url(value)


def _is_plain_url_without_password(value: str) -> bool:
    # A DATABASE_DSN-like name holding a URL: show the URL with only its password masked.
    return "://" in value


def mask_environment(env: dict[str, str]) -> dict[str, str]:
    """A copy of env with every secret masked."""
    return {name: mask_value(name, value) for name, value in env.items()}
