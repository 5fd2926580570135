"""A pytest plugin the grader loads next to nbval: cell limits in CPU time, and a dead
kernel noticed at once.

* nbval's ``--nbval-cell-timeout`` is wall-clock time, so on a loaded machine a correct but
  slow cell times out. Here the limit counts the kernel's CPU time (its processes and
  their children) instead; wall-clock time only stops a cell that waits or sleeps, after
  ``WALL_FACTOR`` times the limit (environment variable ``ATTRIBUTION_COURSE_WALL_FACTOR``).
* nbval waits for a cell's reply until the timeout even if the kernel process is gone
  (``os._exit``, a segfault, the out-of-memory killer); the wait here polls once a second
  and raises :class:`KernelDied` as soon as the kernel is no longer alive.
* nbval gives an interrupted kernel 5 s (wall clock) to answer before it stops it, which a
  loaded machine can exceed; here it is ``ATTRIBUTION_COURSE_OUTPUT_TIMEOUT`` (default 30 s).
* with ``ATTRIBUTION_COURSE_CPU_LOG`` set, the CPU seconds each cell took are written there
  (a JSON list, in cell order) when the session ends: the grader scales the learner's cell
  limit to the reference run's heaviest cell.
"""

from __future__ import annotations

import json
import os
import time
from queue import Empty

KERNEL_DIED = "KERNEL DIED while running this cell"
WALL_FACTOR = float(os.environ.get("ATTRIBUTION_COURSE_WALL_FACTOR", "10"))
OUTPUT_TIMEOUT = float(os.environ.get("ATTRIBUTION_COURSE_OUTPUT_TIMEOUT", "30"))
CPU_LOG_ENV = "ATTRIBUTION_COURSE_CPU_LOG"
_cell_cpu_seconds: list[float] = []  # one entry per cell run, in order


class KernelDied(RuntimeError):
    pass


def kernel_cpu_seconds(running_kernel) -> float | None:
    """CPU time used so far by the kernel process and everything it started (None if unknown)."""
    try:
        import psutil

        process = psutil.Process(running_kernel.km.provisioner.process.pid)
        total = 0.0
        for p in [process, *process.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        return total
    except Exception:  # noqa: BLE001 - no psutil, no provisioner, or the kernel is gone
        return None


def pytest_configure(config) -> None:
    from nbval.kernel import RunningKernel
    from nbval.plugin import IPyNbCell

    original = RunningKernel.await_reply
    if getattr(original, "_watchdog", False):
        return

    def await_reply(self, msg_id, timeout=None):
        start, cpu_start = time.monotonic(), kernel_cpu_seconds(self)
        while True:
            try:
                return original(self, msg_id, timeout=1.0)
            except Empty:
                if not self.is_alive():
                    raise KernelDied(KERNEL_DIED) from None
                if timeout is None:
                    continue
                wall = time.monotonic() - start
                cpu_now = kernel_cpu_seconds(self)
                cpu = wall if cpu_start is None or cpu_now is None else cpu_now - cpu_start
                if cpu >= timeout or wall >= WALL_FACTOR * timeout:
                    raise

    await_reply._watchdog = True
    RunningKernel.await_reply = await_reply

    original_init = IPyNbCell.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.output_timeout = OUTPUT_TIMEOUT

    IPyNbCell.__init__ = init

    original_runtest = IPyNbCell.runtest

    def runtest(self):
        """Run the cell, noting its CPU time (one entry per cell, in order; 0 if unknown)."""
        before = kernel_cpu_seconds(self.parent.kernel)
        try:
            return original_runtest(self)
        finally:
            after = kernel_cpu_seconds(self.parent.kernel)
            _cell_cpu_seconds.append(round(after - before, 3) if before is not None and after is not None else 0.0)

    IPyNbCell.runtest = runtest


def pytest_unconfigure(config) -> None:
    path = os.environ.get(CPU_LOG_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_cell_cpu_seconds, f)
