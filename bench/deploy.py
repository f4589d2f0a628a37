"""Deployment: playbooks/site.yml on the demo topology, first run against the second (idempotent) run.

Reuses the demo's entry point, ``hack/demo.sh up`` (host containers on the gh-demo network,
then ``ansible-playbook -i inventories/demo playbooks/site.yml``, then one client session through
the VIP), twice, and ``hack/demo.sh down`` at the end. The playbook's own time comes from
ansible.posix's timer callback in the demo's site.log; the wall time of the whole ``up`` is kept
too, and each run's slowest tasks (ansible.posix's profile_tasks) and the seconds of each play go
into results.json. Figures: the second run's time against the first (the reference), and the tasks
the second run changed (goal 0). Refuses to run when a demo is already up (it would be taken down).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from bench.common import ROOT, Bench, Figure, not_measured

DEMO = ROOT / "hack" / "demo.sh"
LOG = ROOT / ".gatehouse-demo" / "site.log"
RUN_TIMEOUT = 900
PROFILE_TASKS = 15  # the slowest tasks of each run, from ansible.posix.profile_tasks, into results.json
_PROFILE_LINE = re.compile(r"^(.+?) -+ (\d+\.\d+)s$")
# Under each task header profile_tasks prints the time the task before took: "(0:00:01.234)".
_ELAPSED = re.compile(r"\((\d+):(\d+):(\d+\.\d+)\)\s+\d+:\d+:\d+\.\d+ \*+\s*$")


def play_seconds(log: str) -> dict[str, float]:
    """Seconds of each play of a site.log written with profile_tasks, in the order the plays ran."""
    plays: dict[str, float] = {}
    play, running, pending = "", None, None
    for line in log.splitlines():
        if line.startswith("PLAY ["):
            play = line[len("PLAY [") :].split("]", 1)[0]
            plays.setdefault(play, 0.0)
        elif line.startswith(("TASK [", "RUNNING HANDLER [")):
            pending = play
        elif line.startswith("PLAY RECAP"):
            pending = ""
        elapsed = _ELAPSED.search(line)
        if elapsed:
            if running:
                hours, minutes, seconds = elapsed.groups()
                plays[running] += int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            running, pending = pending, None
    return {name: round(seconds, 2) for name, seconds in plays.items()}


def _up(bench: Bench, n: int) -> dict:
    env = dict(
        os.environ,
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.timer,ansible.posix.profile_tasks",
        PROFILE_TASKS_TASK_OUTPUT_LIMIT=str(PROFILE_TASKS),
    )
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(DEMO), "up"], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    wall = time.monotonic() - started
    log = ""
    if LOG.exists():
        log = LOG.read_text(errors="replace")
        shutil.copy(LOG, bench.work / f"site-{n}.log")
    if proc.returncode != 0:
        raise RuntimeError(f"hack/demo.sh up failed ({proc.returncode}): {proc.stderr[-800:]}")
    took = re.search(r"Playbook run took (\d+) days, (\d+) hours, (\d+) minutes, (\d+) seconds", log)
    playbook = None
    if took:
        d, h, m, s = (int(x) for x in took.groups())
        playbook = float(((d * 24 + h) * 60 + m) * 60 + s)
    changed = sum(int(x) for x in re.findall(r"changed=(\d+)", log.split("PLAY RECAP", 1)[-1]))
    failed = sum(int(x) for x in re.findall(r"failed=(\d+)", log.split("PLAY RECAP", 1)[-1]))
    profile = []
    for line in log.split("TASKS RECAP", 1)[-1].splitlines():
        found = _PROFILE_LINE.match(line.strip())
        if found:
            profile.append({"task": found.group(1).strip(), "s": float(found.group(2))})
    return {
        "wall_s": round(wall, 1),
        "playbook_s": playbook,
        "changed": changed,
        "failed": failed,
        "slowest_tasks": profile[:PROFILE_TASKS],
        "plays_s": play_seconds(log),
    }


def run(bench: Bench) -> list[Figure]:
    if not DEMO.exists():
        return [not_measured("site.yml first vs second run", "hack/demo.sh is missing")]
    net = subprocess.run(["docker", "network", "inspect", "gh-demo"], capture_output=True, check=False)
    if net.returncode == 0:
        return [
            not_measured("site.yml first vs second run", "a demo is up (gh-demo); `make demo-down` first")
        ]
    try:
        first = _up(bench, 1)
        second = _up(bench, 2)
    finally:
        subprocess.run(["bash", str(DEMO), "down"], capture_output=True, timeout=300, check=False)
    key = "playbook_s" if first["playbook_s"] and second["playbook_s"] else "wall_s"
    details = {"first": first, "second": second, "measured": key}
    return [
        Figure(
            "site.yml on the demo topology (7 hosts): second run time",
            "s",
            second[key],
            first[key],
            "first run (from nothing)",
            "ratio <= 0.3",
            details=details,
        ).judge(),
        Figure(
            "site.yml on the demo topology (7 hosts): first run time",
            "s",
            first[key],
            goal="value <= 30",
            details=details,
        ).judge(),
        Figure(
            "site.yml second run: tasks changed",
            "tasks",
            float(second["changed"]),
            float(first["changed"]),
            "changed in the first run",
            "value <= 0",
            details=details,
        ).judge(),
    ]
