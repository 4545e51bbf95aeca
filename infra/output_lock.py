"""One writer per output directory: a lock file naming the process that holds it.

`OUT/.lvd-lock` (`RunLayout(OUT).lock`: its name is the on-disk contract's) holds {"pid", "host", "started"} of
the process that writes OUT. A second run exits with an error naming the holder; a lock left by a process that no
longer exists (killed, crashed) on this host is taken over. The lock belongs to the process: it is taken again at
no cost by the same process and removed when it exits. Whether the holder still runs is `infra.process`'s call.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import time
from pathlib import Path

from dataformat.layout import LOCK_NAME
from infra.process import process_started


class OutputLocked(RuntimeError):
    """Another live process writes this output directory."""


def _holder_alive(holder: dict) -> bool:
    """Whether the process recorded in a lock still runs (same pid, started no later than the lock was taken)."""
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    import psutil

    try:
        started = process_started(int(holder.get("pid", -1)))
    except psutil.Error:  # exists but not ours to inspect
        return True
    if started is None:
        return False
    return started <= float(holder.get("process_started", started)) + 1.0  # else the pid was reused


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}"


_held: dict[Path, dict] = {}


def acquire_output_lock(out: str | Path) -> Path:
    """Take OUT's lock for this process (again at no cost if it holds it already); released at exit.

    Raises OutputLocked (one line, naming the holder) when another live process holds it."""
    path = (Path(out) / LOCK_NAME).resolve()
    if path in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "process_started": process_started(os.getpid()) or time.time()}
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                break
            if holder and _holder_alive(holder):
                raise OutputLocked(f"{path.parent} is being written by another run ({_describe(holder)}); "
                                   f"wait for it to finish, or delete {path} if that run is gone") from None
            if not holder and time.time() - path.stat().st_mtime < 5:
                time.sleep(0.2)  # a lock being written right now
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # the holder is gone (killed or crashed): take the lock over
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise OutputLocked(f"could not take the lock {path}")
    _held[path] = me
    return path


def release_output_lock(out: str | Path) -> None:
    """Give OUT's lock back if this process holds it."""
    path = (Path(out) / LOCK_NAME).resolve()
    if _held.pop(path, None) is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release_output_lock(path.parent)
