"""actfleet.retry: how many calls, which delays, which errors end it at once. No test waits: sleep and the
clock are stand-ins that record what retry() asked for."""

from __future__ import annotations

import pytest

from actfleet.retry import backoff, retry


class Flaky:
    """fails[i] is raised by the i-th call (None: that call returns its number); calls past the list return."""

    def __init__(self, *fails):
        self.fails, self.calls = list(fails), 0

    def __call__(self):
        self.calls += 1
        err = self.fails[self.calls - 1] if self.calls <= len(self.fails) else None
        if err is not None:
            raise err
        return self.calls


class Clock:
    """A monotonic clock that only the recorded sleeps move."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __call__(self) -> float:
        return self.now


def top(_lo, hi):  # the jitter's upper end, so that the bounds themselves are visible
    return hi


E = OSError("transient")


@pytest.mark.parametrize(
    "fails, kwargs, calls, sleeps, raised",
    [
        # succeeds at once: no sleep
        ((), dict(attempts=3), 1, [], None),
        # the third call succeeds: two sleeps, bounds base * 2**n
        ((E, E), dict(attempts=3, base=0.5, cap=20.0), 3, [0.5, 1.0], None),
        # attempts used up: the last error propagates, no sleep after it
        ((E, E, E, E), dict(attempts=3, base=0.5), 3, [0.5, 1.0], OSError),
        # the cap bounds each delay
        ((E,) * 6, dict(attempts=6, base=0.5, cap=2.0), 6, [0.5, 1.0, 2.0, 2.0, 2.0], OSError),
        # another multiplier (the TPU API's polls use 1.5)
        ((E, E, E), dict(attempts=4, base=0.1, cap=5.0, multiplier=1.5), 4, [0.1, 0.15, 0.225], None),
        # an error outside `retryable` propagates at once
        ((ValueError("bad"),), dict(attempts=5, retryable=(OSError,)), 1, [], ValueError),
        # `fatal` wins over `retryable` (InputError is an Exception, retried unless fatal)
        (
            (FileNotFoundError("gone"),),
            dict(attempts=5, retryable=(OSError,), fatal=(FileNotFoundError,)),
            1,
            [],
            FileNotFoundError,
        ),
        # a deadline alone: tries until the clock has passed it (1 + 2 + 4 = 7 >= 5 after the fourth call)
        ((E,) * 10, dict(deadline=5.0, base=1.0, cap=100.0), 4, [1.0, 2.0, 4.0], OSError),
        # attempts and a deadline: whichever comes first
        ((E,) * 10, dict(attempts=2, deadline=100.0, base=1.0), 2, [1.0], OSError),
    ],
)
def test_retry_table(fails, kwargs, calls, sleeps, raised):
    fn, clock = Flaky(*fails), Clock()
    run = lambda: retry(fn, sleep=clock.sleep, clock=clock, rng=top, **kwargs)  # noqa: E731
    if raised:
        with pytest.raises(raised):
            run()
    else:
        assert run() == calls
    assert fn.calls == calls
    assert clock.sleeps == pytest.approx(sleeps)


def test_should_stop_ends_retrying_with_the_last_error():
    fn, clock = Flaky(OSError("one"), OSError("two"), OSError("three")), Clock()
    with pytest.raises(OSError, match="two"):
        retry(fn, attempts=10, sleep=clock.sleep, clock=clock, should_stop=lambda: fn.calls >= 2)
    assert fn.calls == 2 and len(clock.sleeps) == 1


def test_on_retry_sees_each_error_delay_and_attempt_before_its_sleep():
    fn, clock, seen = Flaky(OSError("a"), OSError("b")), Clock(), []
    retry(
        fn,
        attempts=3,
        base=1.0,
        sleep=clock.sleep,
        clock=clock,
        rng=top,
        on_retry=lambda e, d, n: seen.append((str(e), d, n, len(clock.sleeps))),
    )
    assert seen == [("a", 1.0, 1, 0), ("b", 2.0, 2, 1)]


def test_jitter_draws_below_each_bound_and_without_jitter_it_is_the_bound():
    draws = []
    delays = backoff(0.5, 4.0, rng=lambda lo, hi: draws.append((lo, hi)) or hi / 2)
    assert [next(delays) for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert draws == [(0.0, 0.5), (0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 4.0)]
    plain = backoff(0.001, 0.05, jitter=False)
    assert [next(plain) for _ in range(8)] == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05])


@pytest.mark.parametrize("kwargs", [dict(), dict(attempts=0)])
def test_an_unbounded_or_empty_retry_is_refused(kwargs):
    with pytest.raises(ValueError):
        retry(lambda: 1, **kwargs)


def test_default_sleep_is_looked_up_when_called(monkeypatch):
    """Callers (the store's lock, the TPU API) pass no sleep; a patched time.sleep is the one used."""
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    retry(Flaky(E), attempts=2, base=0.25, jitter=False)
    assert slept == [0.25]


# ---------------------------------------------------------------------------------------------------
# The callers keep their counts and delays
# ---------------------------------------------------------------------------------------------------


def test_upload_with_retry_tries_six_times_and_never_retries_a_bad_key(monkeypatch):
    import time

    from actfleet.errors import InputError
    from actfleet.worker.work_loop import upload_with_retry

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr("random.uniform", top)

    class Store:
        def __init__(self, *fails):
            self.calls = Flaky(*fails)

        def put(self, key, data):
            return self.calls()

    store = Store(*(OSError("503"),) * 10)
    with pytest.raises(OSError):
        upload_with_retry(store, "job/shards/x", b"")
    assert store.calls.calls == 6 and slept == [0.5, 1.0, 2.0, 4.0, 8.0]
    slept.clear()
    store = Store(InputError("bad key"))
    with pytest.raises(InputError):
        upload_with_retry(store, "../x", b"")
    assert store.calls.calls == 1 and slept == []
    store = Store(OSError("a"), OSError("b"))
    with pytest.raises(OSError, match="a"):
        upload_with_retry(store, "k", b"", should_stop=lambda: True)
    assert store.calls.calls == 1
    assert upload_with_retry(Store(OSError("a"), OSError("b")), "k", b"") == 3


def test_metadata_reads_retry_five_times_but_not_a_404(monkeypatch):
    import time
    import urllib.error
    import urllib.request

    from actfleet.errors import InputError
    from actfleet.worker import multihost

    slept, answers = [], []
    monkeypatch.setattr(time, "sleep", slept.append)

    def urlopen(req, timeout):
        answers.append(req.full_url)
        raise urllib.error.HTTPError(req.full_url, 503 if "busy" in req.full_url else 404, "x", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("ACTFLEET_METADATA_URL", "http://metadata.test/attrs")
    assert multihost.read_metadata("absent") is None and len(answers) == 1 and slept == []
    with pytest.raises(InputError, match="cannot read instance metadata 'busy'"):
        multihost.read_metadata("busy")
    assert len(answers) == 6 and slept == pytest.approx([0.2, 0.4, 0.8, 1.6])
