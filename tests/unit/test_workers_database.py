"""Pure: the workers' database by name against the environment's, both states side by side."""

from __future__ import annotations

from agent.checks.migrations import Revision, evaluate
from agent.checks.workers_database import (
    DatabaseSide,
    describe_state,
    mismatch_findings,
    restart_verdict,
)
from agent.privileged.sources.connections import ObservedConnection, name_connections
from agent.privileged.sources.database import RoleSession

GRAPH = [Revision("r1"), Revision("r2", ("r1",)), Revision("r3", ("r2",))]


def side(name: str, current: tuple[str, ...] | None, user: str = "app") -> DatabaseSide:
    return DatabaseSide(name, user, evaluate("web.service", current, GRAPH))


def test_states_are_described_in_words() -> None:
    assert describe_state(side("app", ("r2",))) == "at r2, 1 pending (r3)"
    assert describe_state(side("app", ("r3",))) == "at head r3"
    assert describe_state(side("new", None)) == "never migrated (no alembic_version table)"
    assert describe_state(side("new", ()), "meta.versions") == "meta.versions holds no revision"
    assert describe_state(side("app", ("zz",))).startswith("at zz, a revision the deployed")
    assert describe_state(DatabaseSide("x", error="locked")) == \
        "revision state not readable (locked)"


def test_restart_verdicts() -> None:
    assert restart_verdict(side("app", ("r2",)), side("new", None)) == \
        "a restart would make it worse"
    assert restart_verdict(side("app", ("r2",)), side("new", ("r3",))) == \
        "a restart would fix the schema errors"
    assert restart_verdict(side("app", ("r1",)), side("new", ("r2",))) == \
        "a restart would make it better, not good"
    assert restart_verdict(side("app", ("r2",)), side("new", ("r2",))) == \
        "a restart would not help"
    assert restart_verdict(DatabaseSide("app", error="x"), side("new", None)) == \
        "what a restart would give is not known"


def test_finding_names_both_databases_and_a_remedy_for_each() -> None:
    [finding] = mismatch_findings("web.service", "10.0.0.5:5432", side("app", ("r2",)),
                                  side("app_staging", None), 3, other=["reports"])
    assert finding.check == "database_mismatch" and finding.severity == "critical"
    assert finding.message == (
        "the running workers of web.service are connected to database app as role app on "
        "10.0.0.5:5432 (3 connection(s); also to reports), not to app_staging that the unit's "
        "environment names. Running now: app at r2, 1 pending (r3); the schema errors in the "
        "journal come from there. After a restart: app_staging never migrated (no "
        "alembic_version table): a restart would make it worse")
    assert finding.remedy.startswith("now: bring app to head")
    assert "before any restart: if app_staging is meant, migrate it first (agentctl upgrade " \
           "web.service" in finding.remedy


def test_at_head_now_and_ready_after_restart() -> None:
    [finding] = mismatch_findings("web.service", "h:5432", side("old", ("r3",)),
                                  side("new", ("r3",)), 1)
    assert "Running now: old at head r3. After a restart: new at head r3: a restart would " \
           "not help" in finding.message
    assert finding.remedy == ("now: old is fine for the running code; then: systemctl "
                              "restart web.service to move the workers to new")


def test_connections_named_by_client_address_or_backend_pid() -> None:
    tcp = ObservedConnection(10, "tcp", "127.0.0.1", 40000, "127.0.0.1", 5432)
    unix = ObservedConnection(11, "unix", socket_path="/run/postgresql/.s.PGSQL.5432",
                              peer_inode=77)
    hidden = ObservedConnection(12, "tcp", "::ffff:127.0.0.1", 40001, "127.0.0.1", 5432)
    sessions = [RoleSession(500, "app", "127.0.0.1", 40000, "", "idle", "app"),
                RoleSession(501, "app", "", -1, "", "", "app"),
                RoleSession(502, "billing", "", -1, "", "", "billing")]
    named = name_connections([tcp, unix, hidden], sessions, {unix: 501, hidden: 502})
    assert [(n.connection.pid, n.database, n.user, n.how) for n in named] == [
        (10, "app", "app", "client address"), (11, "app", "app", "backend pid"),
        (12, "billing", "billing", "backend pid")]
    assert name_connections([tcp], [], {}) == []
