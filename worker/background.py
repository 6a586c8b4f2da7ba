"""`in_thread`: one call in a daemon thread, its result or exception in a Future. Daemon, so a process that
is exiting (SIGTERM's drain, a fatal error) never waits for it."""

from __future__ import annotations

import threading
from concurrent.futures import Future


def in_thread(fn, *args) -> Future:
    """fn(*args) in a daemon thread; its result or exception comes out of the Future."""
    fut: Future = Future()

    def target():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=target, name=getattr(fn, "__name__", "in_thread"), daemon=True).start()
    return fut
