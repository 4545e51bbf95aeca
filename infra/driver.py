"""Ray workers that stop when the process that submitted their work (the driver) is gone.

A driver killed with SIGKILL cleans nothing up, and Ray's workers run in their own process groups, so a worker
in the middle of a task would go on writing until Ray notices (seconds later, if ever). A task that writes
shared output calls `stop_with_driver(driver)` first: a watchdog thread in the worker checks the driver every
`POLL_S` and, once it has exited, kills the worker's own child processes and exits the worker at once.

The driver is recognised by host, PID namespace, pid and start time, so a reused pid is not taken for it. A
worker on another machine (a real cluster) cannot see the driver and leaves this to Ray, which ends a job's
workers when its driver disconnects.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from infra.process import process_started

POLL_S = 0.1


class DriverGone(RuntimeError):
    """The driver this worker works for has exited; nothing more may be written for it."""


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


@dataclass(frozen=True)
class DriverProcess:
    """Who submitted the work: enough to tell, on the same machine, whether that process still runs."""

    host: str
    pid_namespace: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> DriverProcess:
        pid = os.getpid()
        return cls(socket.gethostname(), _pid_namespace(), pid, process_started(pid) or 0.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriverProcess:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def visible_here(self) -> bool:
        """Whether this process can see the driver's process table entry (same machine, same PID namespace)."""
        return self.host == socket.gethostname() and self.pid_namespace == _pid_namespace() != ""

    def is_gone(self) -> bool:
        """True once the driver has certainly exited; a driver this process cannot see is never 'gone'."""
        if not self.visible_here():
            return False
        started = process_started(self.pid)
        return started is None or abs(started - self.started) > 1.0  # exited, or the pid now names another process

    def check(self) -> None:
        """Raise DriverGone if the driver has exited (called right before a worker makes its work visible)."""
        if self.is_gone():
            raise DriverGone(f"driver pid {self.pid} on {self.host} has exited; this worker's work is abandoned")


_watched: set[DriverProcess] = set()
_watch_lock = threading.Lock()


def _exit_now() -> None:
    """Kill this process's children (decoders, encoders), then this process, without running any cleanup."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(1)


def _watch(driver: DriverProcess) -> None:
    while not driver.is_gone():
        time.sleep(POLL_S)
    _exit_now()


def stop_with_driver(driver: DriverProcess) -> None:
    """Exit this process (a Ray worker) within about POLL_S of `driver` exiting; no-op if it cannot be seen.

    Safe to call once per task: one watchdog thread per worker process and driver."""
    if not driver.visible_here():
        return
    with _watch_lock:
        if driver in _watched or driver.pid == os.getpid():
            return
        _watched.add(driver)
    driver.check()
    threading.Thread(target=_watch, args=(driver,), name="stop-with-driver", daemon=True).start()
