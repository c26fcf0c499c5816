"""The benchmark's CPU accounting attributes work to the process that did it."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.cpu import CpuMeter, CpuUsage

BUSY = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
# A parent that waits while its child burns CPU, says so once it has reaped it, and stays:
# the child's work counts as the parent's, before and after the reaping.
PARENT_OF_BUSY = (
    f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {BUSY!r}]); "
    "print('reaped', flush=True); time.sleep(30)"
)


def test_busy_descendants_count_and_idle_processes_do_not() -> None:
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    parent = subprocess.Popen([sys.executable, "-c", PARENT_OF_BUSY], stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)  # both started; the child is spinning
        meter = CpuMeter({"idle": idle.pid, "parent": parent.pid}, alone={"idle-alone": idle.pid})
        start = meter.mark()
        assert parent.stdout is not None
        assert parent.stdout.readline() == b"reaped\n"
        usage = meter.since(start)
    finally:
        idle.kill()
        parent.kill()
    # The child spent at most the first 0.3 s of wall time before the first mark, so at
    # least 0.3 s of its 0.6 s of CPU fall inside the window: counted while it ran, and in
    # its parent's total once the parent reaped it.
    assert usage.by_process["parent"] >= 0.25
    assert usage.by_process["idle"] < 0.05
    assert usage.by_process["idle-alone"] < 0.05
    assert usage.busy_s >= usage.by_process["idle"]
    assert usage.wall_s > 0


def test_rounds_of_a_phase_add_up() -> None:
    first = CpuUsage(wall_s=2.0, busy_s=3.0, by_process={"ingest": 1.0, "s3": 1.5})
    second = CpuUsage(wall_s=1.0, busy_s=1.5, by_process={"ingest": 0.5, "bench": 0.25})
    both = first + second
    assert (both.wall_s, both.busy_s) == (3.0, 4.5)
    assert both.by_process == {"ingest": 1.5, "s3": 1.5, "bench": 0.25}
    assert both.ms_per_image(9) == 500.0
