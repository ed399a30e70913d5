"""CPU time the benchmark's own processes used over a run's measurement window.

On a shared machine, throughput moves with other users' load, but the CPU seconds a request
costs barely do: CPU time per request is the figure that still compares across runs when
wall-clock ratios are noisy. Each process group is read with psutil (user + system time);
a process that started inside the window counts in full, one that ended counts until its
last reading.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

ProcessGroups = Callable[[], dict[str, list[int]]]  # group name -> pids, e.g. {"replica": [123]}


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    seconds: dict[str, dict[int, float]]  # group -> pid -> cumulative CPU seconds


@dataclass
class CpuUsage:
    window_s: float
    seconds: dict[str, float] = field(default_factory=dict)  # group -> CPU seconds used in the window

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def cores(self, group: str | None = None) -> float:
        """Average cores busy over the window (all groups, or one)."""
        used = self.total_s if group is None else self.seconds.get(group, 0.0)
        return used / self.window_s if self.window_s > 0 else float("nan")


def snapshot(groups: dict[str, list[int]], at: float) -> CpuSnapshot:
    import psutil

    seconds: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        per_pid = {}
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            per_pid[pid] = times.user + times.system
        seconds[name] = per_pid
    return CpuSnapshot(at, seconds)


def usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    out = CpuUsage(window_s=after.at - before.at)
    for name, per_pid in after.seconds.items():
        earlier = before.seconds.get(name, {})
        out.seconds[name] = sum(max(0.0, value - earlier.get(pid, 0.0)) for pid, value in per_pid.items())
    return out
