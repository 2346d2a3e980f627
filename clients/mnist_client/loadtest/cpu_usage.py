"""Who used the CPU while a round was measured: the server, the load tester, or something else.

On one machine the load generator and the server share the cores, and any other busy process
slows the server down without the latency figures saying why. Each measured round therefore
records, in cores (CPU seconds per second of wall time):

- ``machine``: every core's busy time (``/proc/stat``), the whole machine;
- ``generator``: the load tester's own processes (passed in by the runner);
- ``server``: the process tree of the server under test, where its process id is known;
- ``other``: the rest, which includes other servers left running beside the one measured;
- ``stolen``: time the hypervisor gave this virtual machine's cores to other machines (steal time).

A round is flagged when something besides the server took CPU that the server could have used.
Linux only (``/proc``); elsewhere the machine figures are ``None`` and nothing is flagged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mnist_client.cpus import usable_cpus

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Other processes taking this share of the usable cores (or more) disturbed the measurement.
OTHER_SHARE_WARNING = 0.10
# A machine this busy had no core to spare: whatever besides the server ran took the server's CPU.
SATURATED_SHARE = 0.90
# On a saturated machine, the load generator taking this share of the cores took the server's CPU.
GENERATOR_SHARE_WARNING = 0.25


def _machine_ticks() -> tuple[float, float] | None:
    try:
        first = (PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent running something since boot (not idle, iowait or stolen), or None off Linux."""
    ticks = _machine_ticks()
    return None if ticks is None else ticks[0]


def machine_stolen_seconds() -> float | None:
    """CPU seconds the hypervisor ran other virtual machines on this one's cores since boot, or None off Linux."""
    ticks = _machine_ticks()
    return None if ticks is None else ticks[1]


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and ')'
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _own_cpu_seconds(pid: int) -> float:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    # utime and stime (fields 14 and 15), plus the waited-for children's (16 and 17): a gunicorn
    # worker replaced during the round still counts through its parent.
    return sum(int(v) for v in fields[11:15]) / _TICKS


def process_tree_cpu_seconds(pids: int | Sequence[int]) -> float | None:
    """CPU seconds used so far by ``pids`` (one or several) and all their descendants, each process
    counted once; None if none of them is running, or off Linux."""
    roots = [pids] if isinstance(pids, int) else list(pids)
    roots = [pid for pid in roots if (PROC / str(pid)).exists()]
    if not roots:
        return None
    children = _children()
    total, seen, stack = 0.0, set(), roots
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _own_cpu_seconds(current)
        stack.extend(children.get(current, ()))
    return total


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    machine: float | None
    servers: dict[str, float | None]
    stolen: float | None = None


def snapshot(server_pids: Mapping[str, int | Sequence[int]]) -> CpuSnapshot:
    ticks = _machine_ticks()
    return CpuSnapshot(
        wall=time.monotonic(),
        machine=None if ticks is None else ticks[0],
        servers={name: process_tree_cpu_seconds(pid) for name, pid in server_pids.items()},
        stolen=None if ticks is None else ticks[1],
    )


def usage(
    before: CpuSnapshot, after: CpuSnapshot, target: str, generator_cpu_s: float, capacity: int | None = None
) -> dict[str, float | int | None]:
    """Cores used during the round between two snapshots, by the machine, generator, server and the rest."""
    elapsed = after.wall - before.wall
    capacity = capacity or usable_cpus()

    def cores(seconds: float | None) -> float | None:
        return None if seconds is None or elapsed <= 0 else round(max(0.0, seconds) / elapsed, 3)

    machine = None if before.machine is None or after.machine is None else after.machine - before.machine
    start, end = before.servers.get(target), after.servers.get(target)
    server = None if start is None or end is None else end - start
    # Other servers left running beside this one count as "other": they are not the server under test.
    other = None if machine is None else machine - generator_cpu_s - (server or 0.0)
    stolen = None if before.stolen is None or after.stolen is None else after.stolen - before.stolen
    return {
        "capacity": capacity,
        "machine": cores(machine),
        "generator": cores(generator_cpu_s),
        "server": cores(server),
        "other": cores(other),
        "stolen": cores(stolen),
    }


def contention(cpu: Mapping[str, float | int | None]) -> str | None:
    """A sentence when something besides the server took CPU the server could have used, else None."""
    capacity, machine, generator, other = cpu.get("capacity"), cpu.get("machine"), cpu.get("generator"), cpu.get("other")
    if not capacity or machine is None:
        return None
    problems = []
    # Without the server's pids its own CPU is in "other": nothing can be said about other processes then.
    if cpu.get("server") is not None and other is not None and other >= OTHER_SHARE_WARNING * capacity:
        problems.append(f"other processes used {other:.2f} of {capacity} cores")
    stolen = cpu.get("stolen")
    if stolen is not None and stolen >= OTHER_SHARE_WARNING * capacity:
        problems.append(f"the hypervisor gave {stolen:.2f} of {capacity} cores to other virtual machines")
    if machine >= SATURATED_SHARE * capacity and generator is not None and generator >= GENERATOR_SHARE_WARNING * capacity:
        problems.append(f"the load tester used {generator:.2f} of {capacity} cores on a saturated machine")
    return "; ".join(problems) or None
