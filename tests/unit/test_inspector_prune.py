"""Inspector: per-unit caches (probe memo, journal readers and totals) are pruned when a unit
goes away, so a host that churns units does not grow the agent forever."""

from __future__ import annotations

from agent.privileged.inspector import Inspector, InspectorSettings
from agent.snapshot import UnitSnapshot


class FakeSystemd:
    """discover() returns whatever the test sets."""

    def __init__(self) -> None:
        self.units = ["a.service", "b.service"]

    def discover(self, *args: object) -> list[str]:
        return list(self.units)

    def close(self) -> None:
        pass


def test_caches_of_units_gone_are_pruned_after_a_full_run() -> None:
    systemd = FakeSystemd()
    inspector = Inspector(InspectorSettings(), systemd=systemd)  # type: ignore[arg-type]

    def inspect_unit(name: str) -> UnitSnapshot:
        # What a real inspection leaves behind per unit.
        inspector._probe_memo[name] = object()  # type: ignore[assignment]
        inspector._journals[name] = object()  # type: ignore[assignment]
        inspector._journal_totals[name] = {"UndefinedColumn": 1}
        return UnitSnapshot(name, 0.0, True)

    inspector.inspect_unit = inspect_unit  # type: ignore[method-assign]
    inspector.inspect()
    assert set(inspector._probe_memo) == {"a.service", "b.service"}
    systemd.units = ["b.service"]                 # a.service was removed
    inspector.inspect(["b.service"])              # a partial run prunes nothing
    assert "a.service" in inspector._journals
    inspector.inspect()
    for cache in (inspector._probe_memo, inspector._journals, inspector._journal_totals):
        assert set(cache) == {"b.service"}
