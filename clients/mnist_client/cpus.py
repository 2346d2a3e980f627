"""How many CPUs this process may really use: what sizes worker pools in the servers and the load tester.

``os.cpu_count()`` is the host's count. Inside a container both limits that matter are narrower: a
cpuset (the affinity mask) and a CPU quota (``docker run --cpus``, a Kubernetes ``limits.cpu``), which
shows up only in the cgroup files. A pool sized to the host there starts a worker per host CPU, each
with its own model in memory, and the quota then throttles them all.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this container in CPUs (a Kubernetes ``limits.cpu``), or None when unlimited.

    Reads cgroup v2 (``cpu.max``: ``"200000 100000"`` = 2 CPUs, ``"max 100000"`` = none), else v1
    (``cpu/cpu.cfs_quota_us`` / ``cpu/cpu.cfs_period_us``, quota -1 = none).
    """
    try:
        quota_text, period_text = (root / "cpu.max").read_text().split()[:2]
        if quota_text == "max":
            return None
        return int(quota_text) / int(period_text)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask (cpusets), capped by a container CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))  # respects cpusets, unlike os.cpu_count()
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, math.ceil(limit))) if limit is not None else cpus
