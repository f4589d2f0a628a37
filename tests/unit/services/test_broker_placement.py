"""Placement rules of the broker (pure functions)."""

from __future__ import annotations

from gatehouse.broker.placement import Member, choose_desktop, choose_from_pool

NOW = 10_000.0
STALE = 30.0


def reported(
    desktop_id: int, name: str, active: int, capacity: int, age: float = 1.0, **kw: object
) -> Member:
    return Member(desktop_id, name, active_sessions=active, capacity=capacity, reported_at=NOW - age, **kw)  # type: ignore[arg-type]


def test_named_desktop_without_reports_is_placed_when_enabled() -> None:
    member = Member(1, "d1")
    assert choose_desktop(member, NOW, STALE) is member
    assert choose_desktop(Member(1, "d1", enabled=False), NOW, STALE) is None
    assert choose_desktop(None, NOW, STALE) is None


def test_named_desktop_with_stale_report_or_full_is_unavailable() -> None:
    assert choose_desktop(reported(1, "d1", 0, 4, age=STALE + 1), NOW, STALE) is None
    assert choose_desktop(reported(1, "d1", 4, 4), NOW, STALE) is None
    assert choose_desktop(reported(1, "d1", 3, 4, placed_since_report=1), NOW, STALE) is None
    assert choose_desktop(reported(1, "d1", 3, 4), NOW, STALE) is not None


def test_least_loaded_member_wins() -> None:
    members = [reported(1, "a", 3, 4), reported(2, "b", 1, 4), reported(3, "c", 2, 4)]
    assert choose_from_pool(members, NOW, STALE).name == "b"  # type: ignore[union-attr]


def test_load_is_relative_to_capacity() -> None:
    members = [reported(1, "small", 1, 2), reported(2, "big", 4, 10)]
    assert choose_from_pool(members, NOW, STALE).name == "big"  # type: ignore[union-attr]


def test_placements_since_report_count_as_load() -> None:
    members = [reported(1, "a", 1, 10, placed_since_report=3), reported(2, "b", 2, 10)]
    assert choose_from_pool(members, NOW, STALE).name == "b"  # type: ignore[union-attr]


def test_stale_and_never_reported_members_are_unhealthy_once_anyone_reports() -> None:
    members = [reported(1, "old", 0, 10, age=STALE + 0.5), Member(2, "silent"), reported(3, "busy", 8, 10)]
    assert choose_from_pool(members, NOW, STALE).name == "busy"  # type: ignore[union-attr]


def test_report_exactly_at_the_limit_is_still_fresh() -> None:
    assert choose_from_pool([reported(1, "edge", 0, 1, age=STALE)], NOW, STALE) is not None


def test_disabled_members_are_skipped() -> None:
    members = [reported(1, "off", 0, 10, enabled=False), reported(2, "on", 5, 10)]
    assert choose_from_pool(members, NOW, STALE).name == "on"  # type: ignore[union-attr]


def test_full_members_are_skipped_and_all_full_means_unavailable() -> None:
    assert choose_from_pool([reported(1, "a", 2, 2), reported(2, "b", 0, 0)], NOW, STALE) is None
    assert choose_from_pool([reported(1, "a", 2, 2), reported(2, "b", 1, 2)], NOW, STALE).name == "b"  # type: ignore[union-attr]


def test_no_reports_at_all_picks_fewest_placements() -> None:
    members = [Member(1, "a", placed_total=3), Member(2, "b", placed_total=1), Member(3, "c", placed_total=2)]
    assert choose_from_pool(members, NOW, STALE).name == "b"  # type: ignore[union-attr]


def test_ties_are_deterministic_by_name_then_id() -> None:
    members = [reported(3, "c", 1, 4), reported(2, "B", 1, 4), reported(1, "d", 1, 4)]
    assert choose_from_pool(members, NOW, STALE).name == "B"  # type: ignore[union-attr]
    assert choose_from_pool(list(reversed(members)), NOW, STALE).name == "B"  # type: ignore[union-attr]
    same_name = [Member(7, "x"), Member(5, "x")]
    assert choose_from_pool(same_name, NOW, STALE).desktop_id == 5  # type: ignore[union-attr]


def test_empty_pool_is_unavailable() -> None:
    assert choose_from_pool([], NOW, STALE) is None
    assert choose_from_pool([Member(1, "a", enabled=False)], NOW, STALE) is None


def test_persistent_assignment_wins_while_healthy_even_when_busier() -> None:
    members = [reported(1, "mine", 3, 4), reported(2, "idle", 0, 4)]
    assert choose_from_pool(members, NOW, STALE, assigned_id=1).name == "mine"  # type: ignore[union-attr]
    full = [reported(1, "mine", 4, 4), reported(2, "idle", 0, 4)]
    assert choose_from_pool(full, NOW, STALE, assigned_id=1).name == "mine"  # type: ignore[union-attr]


def test_persistent_assignment_moves_when_desktop_is_unhealthy_or_gone() -> None:
    stale = [reported(1, "mine", 0, 4, age=STALE * 2), reported(2, "other", 2, 4)]
    assert choose_from_pool(stale, NOW, STALE, assigned_id=1).name == "other"  # type: ignore[union-attr]
    disabled = [reported(1, "mine", 0, 4, enabled=False), reported(2, "other", 2, 4)]
    assert choose_from_pool(disabled, NOW, STALE, assigned_id=1).name == "other"  # type: ignore[union-attr]
    assert choose_from_pool([reported(2, "other", 2, 4)], NOW, STALE, assigned_id=1).name == "other"  # type: ignore[union-attr]
