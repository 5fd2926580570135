"""A pytest plugin the grader loads next to nbval: notice at once when a kernel dies.

nbval waits for a cell's reply until the cell timeout even if the kernel process is
gone (``os._exit``, a segfault, the out-of-memory killer), and then reports a timeout.
This plugin makes the wait poll once a second and raise :class:`KernelDied` as soon
as the kernel is no longer alive, so the grader can say "the kernel crashed".
"""

from __future__ import annotations

import time
from queue import Empty

KERNEL_DIED = "KERNEL DIED while running this cell"


class KernelDied(RuntimeError):
    pass


def pytest_configure(config) -> None:
    from nbval.kernel import RunningKernel

    original = RunningKernel.await_reply
    if getattr(original, "_watchdog", False):
        return

    def await_reply(self, msg_id, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            try:
                return original(self, msg_id, timeout=max(0.0, min(1.0, remaining)))
            except Empty:
                if not self.is_alive():
                    raise KernelDied(KERNEL_DIED) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    await_reply._watchdog = True
    RunningKernel.await_reply = await_reply
