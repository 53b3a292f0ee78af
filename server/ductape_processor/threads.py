"""The event loop's thread first: the process's other threads run at a lower priority (a higher nice value).

Besides the loop, a processor runs threads of its libraries: gRPC's completion-queue poller and event-engine
threads, the SQLite writer, some clients' I/O threads. gRPC's wake several times a call (the poller once for each
completion it hands to the loop), and on a CPU that they share with the loop, the kernel's fair scheduler lets each
wake-up preempt the loop: about eight context switches a call, each a trip through the scheduler and caches
refilled (bench/README.md, `bench_actions.py`). At a lower priority they still run whenever the loop waits, and
get their share of the CPU when it does not, but no longer preempt it at every wake-up: ActionService.Run went from
about 7.8 to 2.4 involuntary switches of the loop a call, and its CPU a call down by 9-14 % (side by side, server
pinned to one CPU).

Nice values weigh threads against the others of their scheduling group (the container's cgroup, or the session's
autogroup): what gives way is the processor's own helpers to its own loop. A CPU-bound process sharing the
processor's group would take a larger share from those helpers than before (measured: -14 % calls a second under
two such processes at nice 10); `helper_thread_nice: 0` turns this off.

Linux only (a thread's nice value is its own there); elsewhere nothing is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from typing import Final

SWEEP_S: Final = 30.0
"""How often threads started since are lowered too (gRPC's event engine grows its pool under load)."""


def lower_helper_threads(nice: int) -> int:
    """Give every thread of the process but the calling one (the loop's) at least `nice`; returns how many were
    lowered. A thread already at `nice` or above is left as it is (only privileged processes may raise one back)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return 0
    own = threading.get_native_id()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    lowered = 0
    for task in tasks:
        tid = int(task)
        if tid == own:
            continue
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                lowered += 1
    return lowered


class HelperThreads:
    """Keeps the process's other threads below the loop's: at start, then every SWEEP_S for those started since."""

    def __init__(self, nice: int) -> None:
        self._nice = nice
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Lower the threads now and keep doing so (from the running loop's thread)."""
        if self._nice <= 0 or not sys.platform.startswith("linux"):
            return
        self._loop = asyncio.get_running_loop()
        self._sweep()

    def _sweep(self) -> None:
        lower_helper_threads(self._nice)
        assert self._loop is not None
        self._timer = self._loop.call_later(SWEEP_S, self._sweep)

    def stop(self) -> None:
        """Stop sweeping (the threads keep their priority)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
