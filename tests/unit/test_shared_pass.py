"""Pure logic of the shared per-run reads: which kept D-Bus reads may stand, which units a
journal entry of the union belongs to, and how units join and leave the union read."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from agent.model import ExecCommand, UnitProperties
from agent.privileged.inspection import Lookups
from agent.privileged.inspector import UNITS_AT_ONCE, Inspector, InspectorSettings
from agent.privileged.probe_runner import ProbeResult
from agent.privileged.sources import files, journal_api
from agent.privileged.sources.journal import JournalReader, JournalScan, SharedJournal
from agent.privileged.sources.journal_api import COREDUMP_MESSAGE_ID, units_of
from agent.privileged.sources.systemd import _Kept, still_current

PATH = b"/org/freedesktop/systemd1/unit/a_2eservice"


def kept(active: str = "active", sub: str = "running") -> _Kept:
    return _Kept(UnitProperties("a.service", "loaded", active, sub, main_pid=10), PATH,
                 b"\x01" * 16, generation=7)


def row(load: str = "loaded", active: str = "active", sub: str = "running",
        path: bytes = PATH, job: int = 0) -> tuple[Any, ...]:
    return (b"a.service", b"", load.encode(), active.encode(), sub.encode(), b"", path, job,
            b"", b"/")


def test_a_kept_read_stands_only_while_nothing_can_have_changed() -> None:
    assert still_current(kept(), row(), 7)
    assert not still_current(kept(), row(), 8)              # daemon-reload / daemon-reexec
    assert not still_current(kept(), row(), None)           # systemd without the timestamp
    assert not still_current(kept(), row(job=42), 7)        # a job (restart, reload) pending
    assert not still_current(kept(), row(sub="reload"), 7)
    assert not still_current(kept(), row(active="activating"), 7)
    assert not still_current(kept(active="failed", sub="failed"),
                             row(active="failed", sub="failed"), 7)   # may be reloaded anew
    assert not still_current(kept(), row(load="not-found"), 7)
    assert not still_current(kept(), row(path=b"/other"), 7)


def fields(**values: Any) -> dict[str, set[str]]:
    return {k: {v} if isinstance(v, str) else set(v) for k, v in values.items()}


def test_union_entries_go_to_the_units_whose_own_matches_they_meet() -> None:
    units = ["a.service", "b.service"]
    assert units_of(fields(_SYSTEMD_UNIT="a.service", _PID="9"), units) == ["a.service"]
    # PID 1 about a unit (its own _SYSTEMD_UNIT is init.scope).
    assert units_of(fields(_SYSTEMD_UNIT="init.scope", _PID="1", UNIT="b.service"),
                    units) == ["b.service"]
    assert units_of(fields(_PID="7", UNIT="b.service"), units) == []
    # Coredumps and OBJECT_SYSTEMD_UNIT count only from root.
    core = dict(MESSAGE_ID=COREDUMP_MESSAGE_ID, COREDUMP_UNIT="a.service")
    assert units_of(fields(**core, _UID="0"), units) == ["a.service"]
    assert units_of(fields(**core, _UID="33"), units) == []
    assert units_of(fields(_SYSTEMD_UNIT="a.service", _UID="0",
                           OBJECT_SYSTEMD_UNIT="b.service"), units) == units
    assert units_of(fields(_UID="33", OBJECT_SYSTEMD_UNIT="b.service"), units) == []
    # A field may repeat in one entry: any of its values matches, as in sd-journal.
    assert units_of(fields(_PID="1", UNIT=["x.service", "a.service"]), units) == ["a.service"]


class FakeApi:
    """journal_api's union calls over a list of (cursor, unit) entries, oldest first."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self.entries = entries

    def union_tail(self, units: list[str]) -> str | None:
        mine = [c for c, u in self.entries if u in units]
        return mine[-1] if mine else None

    def read_union(self, units: list[str], after: str, max_entries: int,
                   ) -> tuple[list[tuple[dict[str, Any], list[str]]], str]:
        cursors = [c for c, _ in self.entries]
        start = cursors.index(after) + 1
        out = [({"__CURSOR": c, "MESSAGE": "x", "__REALTIME_TIMESTAMP": "1"}, [u])
               for c, u in self.entries[start:] if u in units]
        return out, out[-1][0]["__CURSOR"] if out else after

    def cursors_after(self, units: list[str], after: str, wanted: set[str]) -> set[str]:
        cursors = [c for c, _ in self.entries]
        return {c for c in wanted if cursors.index(c) > cursors.index(after)}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi([("c1", "a"), ("c2", "b"), ("c3", "a")])
    monkeypatch.setattr(journal_api, "available", lambda: True)
    for name in ("union_tail", "read_union", "cursors_after"):
        monkeypatch.setattr(journal_api, name, getattr(fake, name))
    return fake


def cursors(entries: list[dict[str, Any]]) -> list[str]:
    return [e["__CURSOR"] for e in entries]


def test_a_unit_whose_own_read_went_past_the_shared_cursor_skips_what_it_counted(
        api: FakeApi) -> None:
    readers = {u: JournalReader(u) for u in "ab"}
    shared = SharedJournal()
    assert shared.before({}, ["a", "b"]) == {} and shared.cursor == "c3"
    # Their own reads ran after the tail was taken: a's reached an entry logged meanwhile.
    api.entries.append(("c4", "a"))
    readers["a"].cursor, readers["b"].cursor = "c4", "c2"
    shared.after(readers, {"a", "b"}, set())
    assert shared.members == {"a", "b"} and shared.pending == {"a": "c4"}
    api.entries += [("c5", "b"), ("c6", "a")]
    got = shared.before(readers, ["a", "b"])
    assert {u: cursors(e) for u, e in got.items()} == {"a": ["c6"], "b": ["c5"]}
    assert shared.pending == {} and shared.cursor == "c6" and shared.reads == 1


def test_doubt_means_reading_alone_again(api: FakeApi) -> None:
    readers = {u: JournalReader(u) for u in "ab"}
    shared = SharedJournal(cursor="c3", members={"a", "b"}, pending={"a": "gone"})
    got = shared.before(readers, ["a", "b"])
    # a's cursor never came: a reads alone this run; b is served.
    assert "a" not in got and "b" in got and shared.members == {"b"}
    # b's check did not run (its entries were not taken): b leaves too.
    shared.after(readers, set(), {"b"})
    assert shared.members == set()
    # A unit left out of a run leaves the union (it would miss its entries).
    shared = SharedJournal(cursor="c3", members={"a", "b"})
    shared.before({"a": readers["a"]}, ["a"])
    assert shared.members == {"a"}
    # A reader that does not use the API never takes part.
    shared = SharedJournal(cursor="c3", members={"a"})
    assert shared.before({"a": JournalReader("a", source="journalctl")}, ["a"]) == {}
    assert shared.members == set()


class StandInSystemd:
    """systemd as literal data: running units with nothing to look at."""

    def __init__(self, app_dir: str) -> None:
        self.app_dir = app_dir

    def read_unit(self, name: str) -> UnitProperties:
        return UnitProperties(name, "loaded", "active", "running",
                              working_directory=self.app_dir,
                              exec_start=(ExecCommand("/bin/sleep",
                                                      ("/bin/sleep", "infinity")),))

    def close(self) -> None:
        pass


class QuietJournal:
    def __init__(self, unit: str, **kw: Any) -> None:
        self.unit, self.cursor = unit, None

    def read(self) -> JournalScan:
        return JournalScan(self.unit, {})


def test_probes_of_a_run_never_overlap(tmp_path: Any) -> None:
    running, most, lock = [0], [0], threading.Lock()

    def probe(ctx: Any, request: Any, timeout: float) -> ProbeResult:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return ProbeResult(ok=False, error="stand-in", error_kind="app_load")

    units = [f"app{i}.service" for i in range(4)]
    inspector = Inspector(InspectorSettings(state_path=f"{tmp_path}/state.db"),
                          systemd=StandInSystemd(str(tmp_path)), probe=probe,  # type: ignore[arg-type]
                          journal_reader=QuietJournal)  # type: ignore[arg-type]
    runs = [threading.Thread(target=inspector.inspect, args=(units,)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    # Each unit's app loaded at least once (later runs may use the memo), never two at once.
    assert inspector.probe_runs >= len(units) and most[0] == UNITS_AT_ONCE == 1


def test_user_lookups_are_made_once_per_run_and_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []
    monkeypatch.setattr(files, "reader_for", lambda *a: asked.append(a) or files.Reader(33, 33))
    lookups = Lookups()
    for _ in range(3):
        assert lookups.reader_for("www-data", "", (), False) == files.Reader(33, 33)
    lookups.reader_for("www-data", "adm", (), False)
    assert asked == [("www-data", "", (), False), ("www-data", "adm", (), False)]
    assert Lookups().reader_for("www-data", "", (), False) and len(asked) == 3  # a new run


def test_a_failing_shared_step_never_fails_the_run(tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("journal exploded")
    monkeypatch.setattr(SharedJournal, "before", broken)
    inspector = Inspector(InspectorSettings(state_path=f"{tmp_path}/state.db"),
                          systemd=StandInSystemd(str(tmp_path)),  # type: ignore[arg-type]
                          probe=lambda *a: ProbeResult(ok=False, error="x", error_kind="app_load"),
                          journal_reader=QuietJournal)  # type: ignore[arg-type]
    snap = inspector.inspect(["a.service", "b.service"])
    assert [u.unit for u in snap.units] == ["a.service", "b.service"]
    assert all(c.success for u in snap.units for c in u.checks if c.name == "journal")
