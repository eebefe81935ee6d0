"""pytest fixtures for real Flask/Flask-Migrate test apps (loaded as a plugin by conftest).

- ``flask_venv`` (session): the default app venv (tests.harness.apps.DEFAULT_REQUIREMENTS),
  built once and cached under /var/cache/driftwatch-tests/venvs.
- ``make_venv`` (session): ``make_venv(requirements) -> Path`` for other requirement sets
  (e.g. apps.SQLALCHEMY_14_REQUIREMENTS).
- ``app_workspace`` (function): a fresh 0755 directory under /var/lib/driftwatch-tests,
  visible inside sandboxes (unlike /tmp), removed after the test (kept when
  DRIFTWATCH_KEEP_TEST_APPS=1).
- ``make_app`` (function): ``make_app(spec=None, name="site") -> AppDir`` writes an app into
  the workspace.
- ``flask_app`` (function): ``make_app()`` with the default spec (models at 3, r1 -> r2 -> r3).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.apps import (
    BASE_PYTHON,
    DEFAULT_REQUIREMENTS,
    AppDir,
    AppSpec,
    HarnessError,
    app_venv,
    new_workspace,
    write_app,
)


def _skip_or_fail(reason: str) -> None:
    from tests.conftest import skip_or_fail  # late: conftest imports this plugin

    skip_or_fail(reason)


def _venv_unavailable_reason() -> str | None:
    if not os.access(BASE_PYTHON, os.X_OK):
        return f"{BASE_PYTHON} is missing: test app venvs are built from the system python"
    if os.geteuid() != 0:
        return "test app venvs and apps are installed for www-data, which needs root"
    return None


@pytest.fixture(scope="session")
def make_venv() -> Callable[[tuple[str, ...]], Path]:
    """make_venv(requirements) -> path of a cached venv with that requirement set."""
    reason = _venv_unavailable_reason()
    if reason:
        _skip_or_fail(reason)

    def factory(requirements: tuple[str, ...] = DEFAULT_REQUIREMENTS) -> Path:
        try:
            return app_venv(tuple(requirements))
        except HarnessError as exc:  # typically: no route to the package index
            _skip_or_fail(f"could not build the test app venv: {exc}")
            raise  # unreachable: skip_or_fail raises

    return factory


@pytest.fixture(scope="session")
def flask_venv(make_venv: Callable[[tuple[str, ...]], Path]) -> Path:
    """The default test app venv (Flask, Flask-SQLAlchemy, Flask-Migrate, gunicorn)."""
    return make_venv(DEFAULT_REQUIREMENTS)


@pytest.fixture
def app_workspace() -> Iterator[Path]:
    """A fresh 0755 directory under /var/lib/driftwatch-tests, removed afterwards."""
    reason = _venv_unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    path = new_workspace()
    try:
        yield path
    finally:
        if os.environ.get("DRIFTWATCH_KEEP_TEST_APPS") != "1":
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_app(app_workspace: Path) -> Callable[..., AppDir]:
    """make_app(spec=None, name="site") -> AppDir written to app_workspace/name."""

    def factory(spec: AppSpec | None = None, name: str = "site") -> AppDir:
        return write_app(app_workspace / name, spec)

    return factory


@pytest.fixture
def flask_app(make_app: Callable[..., AppDir]) -> AppDir:
    """The default app: models at schema version 3, migrations r1 -> r2 -> r3."""
    return make_app()
