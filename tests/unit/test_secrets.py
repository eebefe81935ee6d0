"""Secret masking: passwords never leave unless revealed."""

from __future__ import annotations

import pytest

from agent.secrets import MASK, is_secret_name, mask_environment, mask_url, mask_value


@pytest.mark.parametrize("name", ["PASSWORD", "DB_PASSWORD", "SECRET_KEY", "API_KEY",
                                  "GITHUB_TOKEN", "pgpassword", "AWS_SECRET_ACCESS_KEY",
                                  "SENTRY_DSN", "AUTH_TOKEN"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["DATABASE_URL", "FLASK_APP", "PATH", "KEYBOARD", "PASSENGER",
                                  "TOKENIZER_MODEL"])
def test_plain_names(name: str) -> None:
    assert not is_secret_name(name)


def test_url_password_masked_user_and_host_kept() -> None:
    assert mask_url("postgresql://app:s3cr%40t@db.example:5432/prod") == \
        f"postgresql://app:{MASK}@db.example:5432/prod"


def test_url_without_password_unchanged() -> None:
    assert mask_url("postgresql://app@db/prod") == "postgresql://app@db/prod"
    assert mask_url("postgresql:///prod?host=/run/postgresql") == \
        "postgresql:///prod?host=/run/postgresql"


def test_query_password_masked() -> None:
    assert mask_url("postgresql://db/prod?user=a&password=hunter2&sslmode=require") == \
        f"postgresql://db/prod?user=a&password={MASK}&sslmode=require"


def test_secret_name_masks_whole_value_urls_included() -> None:
    assert mask_value("SECRET_KEY", "abc") == MASK
    # A Sentry DSN's key is its user part: a secret-named variable is masked whole (#8).
    assert mask_value("SENTRY_DSN", "https://k:v@sentry/1") == MASK
    assert mask_value("SECRET_KEY", "") == ""


def test_mask_environment_never_returns_a_secret() -> None:
    env = {"DATABASE_URL": "postgresql://u:pw1@h/d", "SECRET_KEY": "pw2", "FLASK_APP": "wsgi"}
    shown = mask_environment(env)
    assert "pw1" not in str(shown) and "pw2" not in str(shown)
    assert shown["FLASK_APP"] == "wsgi"
