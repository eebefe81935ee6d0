"""Where the preflight shows: agentctl upgrade's refusal, the metric, /status text, the parser."""

from __future__ import annotations

import io
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.cli.main import build_parser
from agent.daemon.metrics import CollectorStats, DriftwatchCollector
from agent.model import UnitProperties
from agent.preflight.plan import Plan
from agent.preflight.risk import RevisionRisk
from agent.preflight.watch import PreflightWatch, finding, summary
from agent.preflight.probe import OfflineResult, OfflineRevision
from agent.preflight.live import LiveState, TableSize
from agent.cli.render import status_rows
from agent.snapshot import CheckRun, MigrationState, Snapshot, UnitSnapshot
from agent.cli.upgrade import Upgrader, UpgradeError, UpgradeOptions

AT_R1 = MigrationState(True, current=("r1",), heads=("r3",), pending=("r2", "r3"))
CHECKS = tuple(CheckRun(n, True, 0.01) for n in ("unit", "app_load", "database", "migrations"))
CRITICAL = Plan("gunicorn.service", "db:5432/app", ("r1",), ("r3",), (
    RevisionRisk("r2", level="low", reason="only brief catalog locks, nothing to queue behind"),
    RevisionRisk("r3", level="critical", reason="dropping items.email: the code's models "
                 "still map items.email", safer="contract last")))


def unit(**kw: Any) -> UnitSnapshot:
    fields: dict[str, Any] = dict(unit="gunicorn.service", timestamp=0.0, unit_up=True,
                                  database="db:5432/app", migrations=AT_R1, checks=CHECKS,
                                  main_pid=100)
    fields.update(kw)
    return UnitSnapshot(**fields)


class FakeSystemd:
    def restart_unit(self, name: str) -> str:  # pragma: no cover - never reached
        raise AssertionError("no restart expected")

    def read_unit(self, name: str) -> UnitProperties:  # pragma: no cover
        raise AssertionError("no restart expected")


def run_upgrade(plan: Plan, **opts: Any) -> tuple[io.StringIO, list[str]]:
    out, upgraded = io.StringIO(), []
    up = Upgrader(UpgradeOptions("gunicorn.service", assume_yes=True, **opts),
                  FakeSystemd(), lambda name: unit(), None, out, euid=0,  # type: ignore[arg-type]
                  preflight=lambda snap: plan, tool="flask db upgrade")
    up._flask_upgrade = lambda snap, target: upgraded.append(snap.unit)  # type: ignore[method-assign]
    try:
        up.run()
    except UpgradeError as exc:
        out.write(f"ERROR {exc.exit_code}: {exc}")
    return out, upgraded


def test_upgrade_shows_the_preflight_and_refuses_a_critical_revision() -> None:
    out, upgraded = run_upgrade(CRITICAL)
    text = out.getvalue()
    assert text.index("Upgrade plan for gunicorn.service") < text.index("2. r3  [critical]")
    assert "ERROR 1: refusing to upgrade gunicorn.service: 1 pending revision(s) rated " \
           "critical by the preflight (r3)" in text and "--accept-risk" in text
    assert upgraded == []


def test_accept_risk_goes_on_and_low_risk_is_not_asked_about() -> None:
    _, upgraded = run_upgrade(CRITICAL, accept_risk=True)
    assert upgraded == ["gunicorn.service"]
    low = Plan("gunicorn.service", revisions=(RevisionRisk("r2"),))
    _, upgraded = run_upgrade(low)
    assert upgraded == ["gunicorn.service"]
    _, upgraded = run_upgrade(Plan("gunicorn.service", error="the offline probe failed"))
    assert upgraded == ["gunicorn.service"]  # no plan: shown, not a reason to refuse


def test_parser_has_plan_and_accept_risk() -> None:
    args = build_parser().parse_args(["plan", "gunicorn", "--json"])
    assert args.command == "plan" and args.json
    assert build_parser().parse_args(["upgrade", "g", "--accept-risk"]).accept_risk


def test_metric_counts_per_level_and_status_line() -> None:
    snap = unit(preflight=summary(CRITICAL))
    registry = CollectorRegistry()
    registry.register(DriftwatchCollector(lambda: Snapshot((snap,)), CollectorStats()))
    value = registry.get_sample_value
    for level, count in (("low", 1.0), ("high", 0.0), ("critical", 1.0)):
        assert value("driftwatch_pending_migration_risk",
                     {"unit": "gunicorn.service", "level": level}) == count
    rows = dict(status_rows(snap.as_dict(), now=0.0))
    assert rows["preflight"] == ("critical: r3: dropping items.email: the code's models still "
                                 "map items.email")
    f = finding("gunicorn.service", CRITICAL)
    assert f is not None and f.check == "pending_migration_risk" and f.severity == "warning"
    assert finding("gunicorn.service", Plan("u")) is None


def test_watch_memoises_the_offline_sql_and_rereads_the_live_state() -> None:
    runs: list[tuple[list[str], list[str]]] = []
    sizes = iter([10, 2_000_000])

    def offline(ctx: Any, current: list[str], heads: list[str], timeout: float) -> OfflineResult:
        runs.append((current, heads))
        return OfflineResult(True, revisions=(OfflineRevision(
            "r2", "r1", sql="BEGIN; CREATE INDEX ix ON items (email); COMMIT;"),),
            urls={"default": "postgresql://a@h/d"})

    def reader(url: str, tables: Any, columns: Any = ()) -> LiveState:
        return LiveState(tables=(TableSize("items", True, next(sizes), 8192),))

    watch = PreflightWatch(5.0, offline, reader)
    m = MigrationState(True, ("r1",), ("r2",), ("r2",))
    first, _ = watch.check("u", None, m, "code-1")  # type: ignore[arg-type]
    second, found = watch.check("u", None, m, "code-1")  # type: ignore[arg-type]
    assert len(runs) == 1  # same code, same revision: the SQL is not rendered again
    assert watch.parser_runs == 1  # nor parsed again (the parser is a child process)
    assert first and second and (first["risk"], second["risk"]) == ("low", "critical")
    assert found is not None
    none, _ = watch.check("u", None, MigrationState(True, ("r2",), ("r2",)), "code-1")  # type: ignore
    assert none == {"risk": "", "counts": {"low": 0, "high": 0, "critical": 0}, "error": "",
                    "revisions": []}


def test_watch_is_quiet_while_a_migration_runs() -> None:
    watch = PreflightWatch(5.0, lambda *a: pytest.fail("no offline probe while migrating"))
    m = MigrationState(True, ("r1",), ("r2",), ("r2",), in_progress=True)
    assert watch.check("u", None, m, "k") == (None, None)  # type: ignore[arg-type]


def test_watch_parses_again_after_a_parser_timeout_not_after_a_crash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.preflight import watch as watch_module
    from agent.preflight.analysis import Analysis
    from agent.preflight.parse import CRASHED, TIMED_OUT

    replies = iter([[Analysis(error=f"{TIMED_OUT}: x")], [Analysis(error=f"{CRASHED}: x")],
                    [Analysis(error="unexpected third parse")]])
    monkeypatch.setattr(watch_module, "parse_revisions", lambda offline: next(replies))

    def offline(ctx: Any, current: list[str], heads: list[str], timeout: float) -> OfflineResult:
        return OfflineResult(True, revisions=(OfflineRevision("r2", "r1", sql="SELECT 1;"),),
                             urls={"default": "postgresql://a@h/d"})

    watch = PreflightWatch(5.0, offline, lambda *a, **k: LiveState())
    m = MigrationState(True, ("r1",), ("r2",), ("r2",))
    reasons = [watch.check("u", None, m, "code-1")[0]["revisions"][0]["reason"]  # type: ignore
               for _ in range(3)]
    assert watch.parser_runs == 2  # the timeout was tried again, the crash was kept
    assert reasons[0].startswith(TIMED_OUT) and reasons[1] == reasons[2]
    assert reasons[2].startswith(CRASHED)


def test_watch_starts_no_parser_for_sql_it_will_not_analyse() -> None:
    def offline(ctx: Any, current: list[str], heads: list[str], timeout: float) -> OfflineResult:
        return OfflineResult(True, revisions=(OfflineRevision("r2", "r1", sql="SELECT 1;"),),
                             urls={"default": "mysql+pymysql://a@h/d"})

    watch = PreflightWatch(5.0, offline, lambda *a, **k: LiveState())
    summary_, _ = watch.check("u", None, MigrationState(True, ("r1",), ("r2",), ("r2",)),  # type: ignore
                              "code-1")
    assert summary_ and summary_["error"].startswith("the migration preflight is PostgreSQL-only")
    assert watch.parser_runs == 0
