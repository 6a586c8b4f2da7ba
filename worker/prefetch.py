"""Run an iterator ahead of its consumer in a background thread, a bounded number of items ahead.

Used to prepare (read, tokenize, plan) the next work unit while the device computes the current one, so the
device does not wait for the host at unit boundaries.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class Prefetched(Iterator[T]):
    """Iterates `source` in a daemon thread, at most `depth` items ahead. An exception in the source is
    raised here, at the item where it happened. `close()` stops the thread after its current item."""

    def __init__(self, source: Iterable[T], depth: int = 1):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name="prefetch", daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[T]) -> None:
        try:
            for item in it:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer
            self._put((_END, e))
            return
        self._put((_END, None))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item, error = self._q.get()
        if item is _END:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
