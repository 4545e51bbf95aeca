"""Whether a process still runs: what the output lock (`infra.output_lock`) and a Ray worker's driver watchdog
(`infra.driver`) both need to tell a live process from a gone one whose pid may have been reused."""

from __future__ import annotations


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if no such live process runs (zombies
    count as gone). A process that exists but cannot be inspected raises psutil.AccessDenied."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.NoSuchProcess:
        return None
