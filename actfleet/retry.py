"""Retrying a call that fails for a while: the one retry loop and the one backoff schedule.

    retry(fn, attempts=6, base=0.5, cap=20.0, retryable=(OSError,))

calls fn() until it returns. An exception in `fatal`, or not in `retryable`, propagates at once; a retryable
one is retried after the next backoff delay, unless the attempts are used up, the deadline (seconds since the
first call) has passed or should_stop() says so: then that last exception propagates, unchanged. The n-th
delay (n from 0) is uniform(0, min(cap, base * multiplier**n)) ("full jitter", google-api-core's
exponential_sleep_generator too), or that bound itself with jitter=False.

Used by the work loop's uploads, the TPU API client (its requests; its polls use `backoff`), the metadata
reads of multi-host slices and the local store's lock. bootstrap/startup.sh is bash and keeps its own loop.
`sleep` and `clock` are parameters so that tests run without waiting.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def backoff(
    base: float,
    cap: float,
    multiplier: float = 2.0,
    *,
    jitter: bool = True,
    rng: Callable[[float, float], float] | None = None,
) -> Iterator[float]:
    """The delays between tries: min(cap, base * multiplier**n) for n = 0, 1, ..., each drawn uniformly
    below that bound with jitter (so that many clients that failed together do not retry together).
    rng(lo, hi) draws it (random.uniform, looked up when the first delay is drawn)."""
    rng = rng or random.uniform
    bound = min(base, cap)
    while True:
        yield rng(0.0, bound) if jitter else bound
        bound = min(bound * multiplier, cap)


def retry(
    fn: Callable[[], T],
    *,
    attempts: int | None = None,
    deadline: float | None = None,
    base: float = 0.5,
    cap: float = 20.0,
    multiplier: float = 2.0,
    jitter: bool = True,
    retryable: tuple[type[BaseException], ...] = (Exception,),
    fatal: tuple[type[BaseException], ...] = (),
    should_stop: Callable[[], bool] = lambda: False,
    on_retry: Callable[[BaseException, float, int], None] | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[float, float], float] | None = None,
) -> T:
    """fn() with retries (see the module docstring). attempts counts calls (None: no limit); at least one of
    attempts and deadline bounds the loop. on_retry(error, delay, attempt number from 1) runs before each
    sleep. sleep and rng (see backoff) default to time.sleep and random.uniform, looked up at call time."""
    if attempts is None and deadline is None:
        raise ValueError("retry: give attempts, a deadline or both")
    if attempts is not None and attempts < 1:
        raise ValueError(f"retry: attempts must be >= 1, not {attempts}")
    sleep = sleep or time.sleep
    delays = backoff(base, cap, multiplier, jitter=jitter, rng=rng)
    started = clock()
    n = 0
    while True:
        n += 1
        try:
            return fn()
        except fatal:
            raise
        except retryable as e:
            if (
                (attempts is not None and n >= attempts)
                or (deadline is not None and clock() - started >= deadline)
                or should_stop()
            ):
                raise
            delay = next(delays)
            if on_retry is not None:
                on_retry(e, delay, n)
            sleep(delay)
