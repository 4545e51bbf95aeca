"""A bounded window of submitted work: at most `limit` items in flight, the next one submitted as one finishes.

A run of 577M sources cannot create its futures up front (each holds a task run, its arguments and, on Ray,
an object reference in the driver); the window keeps the driver's memory and the scheduler's queue the size
of the window while the input streams past. Items finish in any order; `retry_first` puts work back at the
front (e.g. the single sources of a batch whose worker died).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")
Future = TypeVar("Future")


class BoundedWindow(Generic[Item, Future]):
    """Submit `items` lazily with `submit`, keeping at most `limit` in flight; iterating yields each
    (item, future) once `first_done` says that future finished (it returns the index of one finished future
    among those given, waiting if none is)."""

    def __init__(self, items: Iterable[Item], submit: Callable[[Item], Future], limit: int,
                 first_done: Callable[[list[Future]], int]) -> None:
        if limit < 1:
            raise ValueError(f"a window needs room for at least 1 item in flight, got {limit}")
        self._items, self._submit, self.limit, self._first_done = iter(items), submit, limit, first_done
        self._again: deque[Item] = deque()
        self.submitted = 0
        self.peak_in_flight = 0

    def retry_first(self, items: Iterable[Item]) -> None:
        """Submit these (in order) before anything else not yet submitted."""
        self._again.extendleft(reversed(list(items)))

    def _next_item(self) -> tuple[bool, Item | None]:
        if self._again:
            return True, self._again.popleft()
        for item in self._items:
            return True, item
        return False, None

    def __iter__(self) -> Iterator[tuple[Item, Future]]:
        in_flight: list[tuple[Item, Future]] = []
        while True:
            while len(in_flight) < self.limit:
                found, item = self._next_item()
                if not found:
                    break
                in_flight.append((item, self._submit(item)))
                self.submitted += 1
            self.peak_in_flight = max(self.peak_in_flight, len(in_flight))
            if not in_flight:
                return
            yield in_flight.pop(self._first_done([future for _, future in in_flight]))
