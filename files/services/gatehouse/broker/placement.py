"""Where a session goes: pure functions over a snapshot of desktops and their load reports.

Rules (also in docs/broker-api.md):

- A member is *healthy* when it is enabled and its latest agent report is at most ``stale_after``
  seconds old. Exception: when no member of the candidate set has ever reported, reports are not
  used at all and every enabled member counts as healthy (a deployment without load reports).
- Load = (active_sessions + sessions placed since that report) / capacity. A reporting member at
  or over capacity (load ≥ 1, or capacity 0) is not chosen for a new placement.
- A named desktop is placed when it is enabled and, if it has ever reported, healthy and under
  capacity.
- A pool: a persistent pool's existing assignment wins while that desktop is still a healthy
  member (capacity does not matter: the user's own session counts in it). Otherwise the
  least-loaded healthy member; without reports, the member with the fewest placements so far.
  Ties go to the lower name, then the lower id, so the choice is deterministic.
- Sites (docs/multisite.md): a site is *down* when at least one of its desktops has ever reported
  and no desktop of the site has reported within ``stale_after`` seconds (its agents went silent
  together: the site, its network or its link is gone). A desktop of a down site is never placed,
  even one that never reports itself; the rules above then apply to the remaining members. A site
  none of whose desktops ever reported is not down (it does not use reports), and desktops
  without a site are never excluded this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    desktop_id: int
    name: str
    enabled: bool = True
    active_sessions: int | None = None  # None: never reported
    capacity: int | None = None
    reported_at: float | None = None
    placed_since_report: int = 0
    placed_total: int = 0
    site: str = ""

    @property
    def has_reported(self) -> bool:
        return self.reported_at is not None

    def fresh(self, now: float, stale_after: float) -> bool:
        return self.reported_at is not None and now - self.reported_at <= stale_after

    def load(self) -> float:
        """Fraction of capacity in use, counting placements the agent has not reported yet."""
        if not self.capacity or self.capacity <= 0:
            return float("inf")
        return ((self.active_sessions or 0) + self.placed_since_report) / self.capacity


def down_sites(last_reports: Mapping[str, float], now: float, stale_after: float) -> frozenset[str]:
    """The sites whose latest report (``last_reports``: site -> time) is over ``stale_after`` old."""
    return frozenset(site for site, last in last_reports.items() if site and now - last > stale_after)


def healthy(member: Member, now: float, stale_after: float, *, reports_used: bool) -> bool:
    if not member.enabled:
        return False
    return member.fresh(now, stale_after) if reports_used else True


def choose_desktop(
    member: Member | None, now: float, stale_after: float, *, down: frozenset[str] = frozenset()
) -> Member | None:
    """A named desktop: placed when enabled, its site not ``down``, and (if it ever reported) fresh
    and under capacity."""
    if member is None or not member.enabled or member.site in down:
        return None
    if member.has_reported and (not member.fresh(now, stale_after) or member.load() >= 1):
        return None
    return member


def choose_from_pool(
    members: list[Member],
    now: float,
    stale_after: float,
    *,
    assigned_id: int | None = None,
    down: frozenset[str] = frozenset(),
) -> Member | None:
    """The member to place a pool session on, or None (nothing available); members of ``down``
    sites are left out first."""
    members = [m for m in members if m.site not in down]
    reports_used = any(m.has_reported for m in members)
    usable = [m for m in members if healthy(m, now, stale_after, reports_used=reports_used)]
    if assigned_id is not None:
        for member in usable:
            if member.desktop_id == assigned_id:
                return member
    if reports_used:
        candidates = [m for m in usable if m.load() < 1]
        if not candidates:
            return None
        return min(candidates, key=lambda m: (m.load(), m.name.lower(), m.desktop_id))
    if not usable:
        return None
    return min(usable, key=lambda m: (m.placed_total, m.name.lower(), m.desktop_id))
