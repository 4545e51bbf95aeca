"""One worker thread that runs calls in order, beside the caller: for C work that releases the GIL (x264,
JPEG encoding) while the caller goes on decoding and analysing."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class SerialWorker:
    """Runs submitted calls one after another on a thread of its own, fed through a queue of at most
    `queued` calls (the caller waits when it is full, which bounds the memory the arguments hold).

    An exception in a call is raised in the caller's thread by the next `submit` or by `join`; the calls
    after a failed one are skipped.
    """

    def __init__(self, name: str, queued: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=queued)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., Any], *args: Any) -> None:
        self._raise_error()
        self._queue.put((call, args))

    def join(self) -> None:
        """Wait for every submitted call, stop the thread, raise the first call's error if one failed."""
        self.stop()
        self._raise_error()

    def stop(self) -> None:
        """Wait for the submitted calls and stop the thread; errors stay unraised (a caller cleaning up)."""
        if self._thread.is_alive():
            self._queue.put((None, ()))
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            call, args = self._queue.get()
            if call is None:
                return
            if self._error is None:
                try:
                    call(*args)
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    self._error = error
