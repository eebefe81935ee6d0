"""Broken migration directories, read by the probe's own code with the real Alembic (no
database): duplicate ids and cycles are `migration_graph_invalid`, never a false
`db_revision_unknown`; a script Alembic cannot load is `migration_scripts_broken` only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.checks.migrations import evaluate, revisions_from_dicts
from agent.asuser import probe_child as child

UNIT = "gunicorn.service"


def write_scripts(root: Path, scripts: dict[str, tuple[str, str | None]]) -> Any:
    """FILE -> (revision, down_revision) in ROOT/versions; an Alembic Config for ROOT."""
    from alembic.config import Config

    (root / "versions").mkdir(parents=True)
    (root / "script.py.mako").write_text("")
    for name, (rev, down) in scripts.items():
        (root / "versions" / f"{name}.py").write_text(
            f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
            "depends_on = None\n\ndef upgrade():\n    pass\n\ndef downgrade():\n    pass\n")
    config = Config()
    config.set_main_option("script_location", str(root))
    return config


def read(config: Any) -> dict[str, Any]:
    report: dict[str, Any] = {"revisions": [], "heads": []}
    child.read_revisions(config, report)
    return report


def checks(state: Any) -> list[str]:
    return [f.check for f in state.findings]


def test_healthy_graph(tmp_path: Path) -> None:
    config = write_scripts(tmp_path, {"a": ("a", None), "b": ("b", "a"), "c": ("c", "b")})
    report = read(config)
    assert [r["revision"] for r in report["revisions"]] == ["c", "b", "a"]
    assert report["heads"] == ["c"]
    state = evaluate(UNIT, ["b"], revisions_from_dicts(report["revisions"]))
    assert checks(state) == ["pending_migrations"]


def test_duplicate_revision_ids(tmp_path: Path) -> None:
    config = write_scripts(tmp_path, {"a": ("a", None), "b": ("b", "a"), "b_copy": ("b", "a"),
                                      "c": ("c", "b")})
    graph = revisions_from_dicts(read(config)["revisions"])
    assert sorted(r.revision for r in graph) == ["a", "b", "b", "c"]
    for current in (["c"], ["b"], ["a"]):
        state = evaluate(UNIT, current, graph)
        assert "migration_graph_invalid" in checks(state)
        assert "db_revision_unknown" not in checks(state)
        (f,) = [f for f in state.findings if f.check == "migration_graph_invalid"]
        assert f.severity == "critical" and "revision id defined twice: b" in f.message


def test_cycle(tmp_path: Path) -> None:
    config = write_scripts(tmp_path, {"a": ("a", "c"), "b": ("b", "a"), "c": ("c", "b")})
    graph = revisions_from_dicts(read(config)["revisions"])
    assert sorted(r.revision for r in graph) == ["a", "b", "c"]
    state = evaluate(UNIT, ["b"], graph)
    assert checks(state) == ["migration_graph_invalid"]
    assert "cycle" in state.findings[0].message


def test_unloadable_script_is_not_an_unknown_revision(tmp_path: Path) -> None:
    config = write_scripts(tmp_path, {"a": ("a", None), "b": ("b", "a")})
    (tmp_path / "versions" / "b.py").write_text("revision = 'b'\ndown_revision = 'a'\nx = (\n")
    with pytest.raises(SyntaxError):
        read(config)
    # The probe reports that as migrations_error; the revision state must not invent
    # an unknown revision from an empty graph.
    state = evaluate(UNIT, ["b"], [], graph_error="a migration script could not be read")
    assert state.unknown == () and state.pending is None
    assert checks(state) == []
    assert evaluate(UNIT, ["b"], []).unknown == ("b",)  # no error: really unknown


def test_each_migration_file_is_loaded_once(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from alembic.script import base
    config = write_scripts(tmp_path, {"a": ("a", None), "b": ("b", "a"), "c": ("c", "b")})
    loaded: list[str] = []
    original = base.util.load_python_file

    def counting(dir_: str, filename: str) -> Any:
        loaded.append(filename)
        return original(dir_, filename)

    monkeypatch.setattr(base.util, "load_python_file", counting)
    report = read(config)
    assert [r["revision"] for r in report["revisions"]] == ["c", "b", "a"]
    assert report["heads"] == ["c"]
    assert sorted(loaded) == ["a.py", "b.py", "c.py"]
