"""Resident memory and CPU time of a process and its descendants, read from /proc."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    text = (PROC / str(pid) / "stat").read_text()
    return text.rsplit(")", 1)[1].split()


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return parents


def tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (an nginx master and its worker)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, ()))
    return found


def rss_bytes(pid: int) -> int:
    """VmRSS of one process, from /proc/<pid>/status."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS line


def tree_rss_bytes(pid: int) -> int:
    return int(sum(_or_zero(rss_bytes, member) for member in tree(pid)))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    return sum(_or_zero(cpu_seconds, member) for member in tree(pid))


def _or_zero(read: Callable[[int], float], pid: int) -> float:
    try:
        return read(pid)
    except (OSError, IndexError, ValueError):
        return 0.0  # exited between listing and reading


@dataclass(frozen=True, slots=True)
class CpuTicks:
    """Clock ticks of one CPU since boot: busy (interrupts included), stolen, and all."""

    busy: int
    steal: int
    total: int


def cpu_ticks() -> dict[int, CpuTicks]:
    """Per CPU, from /proc/stat. Busy includes softirq time, where loopback traffic is handled;
    steal is time the hypervisor gave to someone else while this CPU wanted to run.
    """
    ticks: dict[int, CpuTicks] = {}
    for line in (PROC / "stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
        busy = user + nice + system + irq + softirq
        ticks[int(name.removeprefix("cpu"))] = CpuTicks(busy, steal, busy + steal + idle + iowait)
    return ticks


def cpu_percent(
    before: dict[int, CpuTicks], after: dict[int, CpuTicks]
) -> tuple[dict[int, float], dict[int, float]]:
    """Per CPU, the percent of time busy and the percent stolen between two readings."""
    busy, steal = {}, {}
    for cpu, end in after.items():
        start = before.get(cpu, CpuTicks(0, 0, 0))
        elapsed = end.total - start.total or 1
        busy[cpu] = 100 * (end.busy - start.busy) / elapsed
        steal[cpu] = 100 * (end.steal - start.steal) / elapsed
    return busy, steal
