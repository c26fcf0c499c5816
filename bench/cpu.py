"""Where the CPU goes during a benchmark phase: the whole machine, and each stack process.

On a machine whose cores the model and the pipeline share, wall-clock figures alone cannot
say whether the pipeline is slow or simply out of CPU. Busy CPU-seconds per image can: they
bound what any scheduling could achieve (`pipeline_to_model_ceiling` in bench/throughput.py).
Linux only (/proc), like the local stack.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal ...; idle and iowait
# are the only columns in which a core did no work.
IDLE_COLUMNS = (3, 4)


def machine_busy_s() -> float:
    """CPU-seconds every core together has spent working since boot."""
    columns = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    return sum(int(v) for i, v in enumerate(columns) if i not in IDLE_COLUMNS) / TICKS_PER_S


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU-seconds used so far), for every process still running; a
    process's time includes that of its children it has waited for (a Postgres backend that
    ended stays in the postmaster's count)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        own_and_reaped = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime .. cstime
        table[int(entry.name)] = (int(fields[1]), own_and_reaped / TICKS_PER_S)
    return table


def process_cpu_s(roots: Mapping[str, int], *, alone: Mapping[str, int]) -> dict[str, float]:
    """CPU-seconds of each process in `roots` with all its descendants (a Celery pool's
    children, uvicorn's workers), and of each process in `alone` without them."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    used = {}
    for name, root in roots.items():
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            total += table.get(pid, (0, 0.0))[1]
            stack.extend(children.get(pid, []))
        used[name] = total
    for name, pid in alone.items():
        used[name] = table.get(pid, (0, 0.0))[1]
    return used


@dataclass(frozen=True)
class CpuMark:
    wall: float
    busy: float
    processes: dict[str, float]


@dataclass(frozen=True)
class CpuUsage:
    wall_s: float
    busy_s: float
    by_process: dict[str, float]

    @property
    def cores_busy(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s else 0.0

    def ms_per_image(self, images: int) -> float:
        return 1000 * self.busy_s / images

    def __add__(self, other: CpuUsage) -> CpuUsage:
        """Two measured spans as one (a phase run in several rounds)."""
        return CpuUsage(
            wall_s=self.wall_s + other.wall_s,
            busy_s=self.busy_s + other.busy_s,
            by_process={
                name: self.by_process.get(name, 0.0) + other.by_process.get(name, 0.0)
                for name in {**self.by_process, **other.by_process}
            },
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.busy_s, 3),
            "cores_busy": round(self.cores_busy, 2),
            "by_process": {k: round(v, 3) for k, v in self.by_process.items()},
        }


class CpuMeter:
    """Marks before and after a phase; `roots` names the processes to attribute CPU to, with
    their descendants, `alone` those to count without them (the process that started the
    stack is every service's parent)."""

    def __init__(self, roots: Mapping[str, int], *, alone: Mapping[str, int]) -> None:
        self.roots = dict(roots)
        self.alone = dict(alone)

    def mark(self) -> CpuMark:
        return CpuMark(
            time.perf_counter(), machine_busy_s(), process_cpu_s(self.roots, alone=self.alone)
        )

    def since(self, start: CpuMark) -> CpuUsage:
        end = self.mark()
        return CpuUsage(
            wall_s=end.wall - start.wall,
            busy_s=end.busy - start.busy,
            by_process={
                name: end.processes[name] - start.processes.get(name, 0.0) for name in end.processes
            },
        )
