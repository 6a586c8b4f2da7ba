"""`actfleet work`: claim a unit, extract it, upload its shards, commit; repeat until the job is done.

Each unit flows through three stages joined by queues of fixed depth, so memory stays bounded whatever the
dataset size and a slow store slows the device loop down instead of piling up bytes:

    device loop (extractor.run_stream) --batches--> serializer (ShardWriter) --shards--> uploader -> commit

The device loop is one stream across units: a few batches before the current unit's end, the next unit is
claimed and prepared (rows read, tokenized, planned) in a background thread, and the stream launches its
first batch before the current unit's last one is collected, so the device does not drain at unit
boundaries. At most three units are held at once (one finishing its uploads, one computing, one prepared).

Exactly once: a unit's done record is created only after every batch of it went through its serializer and
every shard was uploaded. A heartbeat thread per unit renews its lease (generation-matched) and writes this
worker's record; if a lease is lost, that unit's remaining batches are discarded and nothing of it is
committed (the other units carry on). If an upload still fails after retries with jittered backoff, the unit
is abandoned (lease released) and never marked done.

SIGTERM (a spot TPU's ~30 s notice): stop claiming (a unit already claimed and prepared still runs); keep
going only while the units held can still commit before `drain_seconds` have passed, else abandon them
(release the leases so another worker takes them at once), then exit 0. The deadline is hard: an upload or an
engine step that is still blocking DRAIN_GRACE_S after it cannot be interrupted, so the process gives the
leases it holds back and exits 0 from a watchdog thread (install_sigterm), whatever its other threads do.

Errors that every retry would meet again stop the worker instead of abandoning and re-claiming units forever:
bad input (InputError, exit 2) and a full disk (ENOSPC, EDQUOT, EFBIG: DiskFull, exit 74); the lease in flight
is released first, and nothing committed is touched. A store that is unavailable for a while (a GCS outage, a
local key lock held by a stalled writer: actfleet.store.unavailable) is waited out with capped backoff while
claiming; a unit whose upload or commit meets it is abandoned, and the loop claims again once the store
answers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue as queue_mod
import random
import signal
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

from actfleet import work_queue as q
from actfleet.errors import DiskFull, InputError, disk_full_error, disk_full_is_fatal, is_disk_full
from actfleet.retry import backoff
from actfleet.store import Store, unavailable
from actfleet.worker.background import in_thread
from actfleet.worker.samples import Batch, Row

if TYPE_CHECKING:
    from actfleet.worker.shards import Shard

log = logging.getLogger("actfleet.work")


@dataclass
class PreparedUnit:
    """One unit made ready for the device by the extractor's host side."""

    start: int
    stop: int
    rows: list[Row]  # the unit's input rows (the done record's skip reasons come from them)
    work: Any  # the extractor's own prepared form: only its run_stream reads it
    batches: int  # how many Batches run_stream yields for this unit


class UnitExtractor(Protocol):
    """What the loop needs from the extractor, built once per worker from the job's options."""

    def fingerprint(self) -> str:
        """sha256 of the input bytes this extractor reads (compared with the job's)."""

    def model_sha256(self) -> str:
        """The digest of the model files it loaded (worker/pinning.py; "" when the job pins no model)."""

    def prepare(self, start: int, stop: int) -> PreparedUnit:
        """Read rows start..stop-1 and prepare them: host work only (it runs while another unit computes)."""

    def run_stream(self, units: Iterable[PreparedUnit]) -> Iterator[tuple[int, Batch]]:
        """(index in `units`, Batch) for the units in order, taking the next unit from `units` before the
        previous one's last batch is yielded (every batch of the units before it has been)."""

    def shard_writer(self, unit: int) -> "ShardSink":
        """A fresh serializer for one unit."""


class ShardSink(Protocol):
    """Shards come out in part order, each with the token count its writer already knows."""

    def add(self, batch: Batch) -> "list[Shard]":
        """Take a batch; return the shards that are now complete."""

    def finish(self) -> "list[Shard]":
        """The remaining shards."""


@dataclass
class WorkResult:
    units_committed: int = 0
    units_abandoned: int = 0
    tokens: int = 0
    stopped_by_signal: bool = False
    job_complete: bool = False


class Stop(Exception):
    """The unit stops early: lease lost, drain deadline, or an upload that failed for good."""


# After SIGTERM, how long past the drain deadline a blocking upload or engine step is waited for before the
# process releases its leases and exits anyway (install_sigterm). drain_seconds + this + RELEASE_WAIT_S must stay
# under systemd's TimeoutStopSec (30 s) and the spot notice (~30 s): 20 + 2 + 3 with the defaults.
DRAIN_GRACE_S = 2.0
RELEASE_WAIT_S = 3.0
# While waiting on others' leases: how often the lease listing is read to see one of them go (committed or
# released), so a worker wakes within seconds instead of at the next expiry or third of a lease.
WAIT_POLL_S = 2.0


def is_fatal(e: BaseException) -> bool:
    """Errors that stop the worker: every retry would fail the same way (bad input, a full disk), or not an
    Exception at all (KeyboardInterrupt, SystemExit)."""
    return not isinstance(e, Exception) or isinstance(e, InputError) or is_disk_full(e)


def one_line(e: BaseException) -> BaseException:
    """A disk-full OSError as DiskFull (its one-line message and exit 74); anything else unchanged."""
    if isinstance(e, OSError) and is_disk_full(e):
        return disk_full_error(e, "writing")
    return e


def _never() -> bool:
    return False


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    """time.sleep(seconds), cut short (within 0.1 s) once stop() is true: a retry's backoff must not outlast a
    drain deadline."""
    end = time.monotonic() + seconds
    while not stop() and (left := end - time.monotonic()) > 0:
        time.sleep(min(0.1, left))


def upload_with_retry(
    store: Store,
    key: str,
    data: bytes,
    *,
    attempts: int = 6,
    base: float = 0.5,
    cap: float = 20.0,
    should_stop: Callable[[], bool] = _never,
) -> int:
    """store.put with jittered exponential backoff ("full jitter", actfleet.retry); raises the last error after
    `attempts`, or at once for a bad key (InputError) or a full disk (DiskFull): retrying cannot help. Any
    other error is retried: network, 5xx after the client's own retries... The backoff's sleeps end early once
    should_stop() is true."""
    from actfleet.retry import retry

    def put() -> int:
        with disk_full_is_fatal(f"storing {key} in {getattr(store, 'url', store)}:"):
            return store.put(key, data)

    return retry(
        put,
        attempts=attempts,
        base=base,
        cap=cap,
        fatal=(InputError, DiskFull),
        should_stop=should_stop,
        on_retry=lambda err, delay, _n: log.warning("upload of %s failed (%s); retrying in %.1fs", key, err, delay),
        sleep=None if should_stop is _never else (lambda seconds: _sleep_unless(should_stop, seconds)),
    )


class _LeaseKeeper(threading.Thread):
    """Renews the lease every lease_seconds/3 and writes the worker record; flags a lost lease."""

    def __init__(
        self,
        store: Store,
        lease: q.Lease,
        lease_seconds: float,
        record: q.WorkerProgress,
        job: str,
        healthy: Callable[[], bool] = lambda: True,
    ):
        super().__init__(name=f"lease-{lease.unit}", daemon=True)
        self.store, self.lease, self.lease_seconds, self.record, self.job = store, lease, lease_seconds, record, job
        self.healthy = healthy
        self.lock = threading.Lock()
        self.lost = threading.Event()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            if not self.healthy():  # a slice stalled in a collective: let the lease (and heartbeat) lapse
                log.warning("unit %d: not renewing the lease: the slice makes no progress", self.lease.unit)
                continue
            with self.lock:
                try:
                    self.lease = q.renew(self.store, self.lease, self.lease_seconds)
                except q.LeaseLost:
                    self.lost.set()
                    return
                except Exception as e:  # transient: the next tick tries again; expiry is lease_seconds away
                    log.warning("lease renewal for unit %d failed: %s", self.lease.unit, e)
            try:
                q.write_worker_record(self.store, self.job, self.record)
            except Exception as e:
                log.warning("worker record write failed: %s", e)

    def current(self) -> q.Lease:
        with self.lock:
            return self.lease

    def stop(self) -> q.Lease:
        self.stopped.set()
        self.join()
        return self.lease


@dataclass
class Worker:
    store: Store
    spec: q.JobSpec
    extractor: UnitExtractor
    worker_id: str
    lease_seconds: float = 300.0
    queue_depth: int = 2
    drain_seconds: float = 20.0
    upload_attempts: int = 6
    on_event: Callable[[str, dict], None] = lambda kind, info: None
    # Whether the compute makes progress (a multi-host slice: no engine step stalled); the lease is renewed
    # only while it does (actfleet.worker.multihost).
    healthy: Callable[[], bool] = lambda: True
    max_units: int | None = None  # claim at most this many units (None: until the job is done)
    # The next unit is claimed and prepared when the current one has this many batches left to yield: time
    # for the host work while the device still has some of this unit to compute.
    prefetch_batches: int = 2
    # False: one unit at a time, each committed before the next is claimed (`extract --max-tokens`, which stops
    # after the unit in which the stored tokens reach the limit, must not have claimed the next one already).
    stream_units: bool = True
    # Called by the drain watchdog once DRAIN_GRACE_S past the drain deadline the loop is still blocked (an
    # upload, an engine step), after it released the leases: install_sigterm makes it end the process.
    on_drain_timeout: Callable[[], None] | None = None
    # Read the rollout's drain request between units (reconcile, infra/rollout.py); off for local/tests.
    drain_requests: bool = True
    drain_seen: bool = field(default=False, init=False)
    _stop_at: float | None = field(default=None, init=False)  # monotonic deadline once SIGTERM arrived
    record: q.WorkerProgress = field(init=False)

    def __post_init__(self):
        self.record = q.WorkerProgress(self.worker_id, state="starting", started_at=time.time())
        self.offset = zlib.crc32(self.worker_id.encode()) % max(1, self.spec.units)
        self.draining = threading.Event()
        self._pinned: dict[str, str] | None = None
        self._claimed = 0
        self._record_lock = threading.Lock()  # units finish in their own threads
        self._held: dict[int, _LeaseKeeper] = {}  # units claimed and not yet committed or released, by unit
        self._finished = threading.Event()  # run() ended
        self._returned = False  # ... with a result, not an exception

    # -- signals --------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop claiming; the units held get until drain_seconds from now."""
        if not self.draining.is_set():
            self._stop_at = time.monotonic() + self.drain_seconds
            self.draining.set()
            log.info("stop requested: draining (%.0fs)", self.drain_seconds)
            if self.on_drain_timeout is not None:
                threading.Thread(target=self._drain_watchdog, name="drain-watchdog", daemon=True).start()

    def _drain_watchdog(self) -> None:
        """DRAIN_GRACE_S past the drain deadline, a loop still blocked in an upload or an engine step (neither can
        be interrupted from outside) gives every lease it holds back (generation-matched: a lease taken over is
        never deleted; a commit landing meanwhile stays committed) and on_drain_timeout ends the process."""
        if self._finished.wait(self.drain_seconds + DRAIN_GRACE_S):
            # The loop returned in time, but the process may still wait at exit for threads it cannot interrupt
            # (an executor's worker inside an engine step, JAX's atexit): end it at the deadline all the same,
            # unless the loop failed (that exit code is the command's to give).
            time.sleep(max(0.0, self._stop_at + DRAIN_GRACE_S - time.monotonic()))
            if self._returned:
                self.on_drain_timeout()
            return
        held = list(self._held.values())
        log.warning(
            "drain deadline passed %.0fs ago with the loop still blocked: releasing %d lease(s)",
            DRAIN_GRACE_S,
            len(held),
        )

        def give_back() -> None:
            for keeper in held:
                keeper.stopped.set()  # no renewal after this
                try:
                    q.release(self.store, keeper.current())
                except Exception as e:  # the lease then expires: slower for the next worker, never wrong
                    log.warning("releasing the lease of unit %d failed: %s", keeper.lease.unit, e)
            self._write_record("stopped")
            self.on_event("drain-timeout", {"released": sorted(k.lease.unit for k in held)})

        t = threading.Thread(target=give_back, name="drain-release", daemon=True)
        t.start()
        # A store that does not answer, or a stderr pipe nobody reads, must not hold the exit past the stop timeout.
        t.join(RELEASE_WAIT_S)
        if not self._finished.is_set():
            self.on_drain_timeout()

    def _past_deadline(self) -> bool:
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    def _stop_claiming(self) -> bool:
        return (
            self.draining.is_set()
            or (self.max_units is not None and self._claimed >= self.max_units)
            or self._drain_requested()
        )

    def _drain_requested(self) -> bool:
        """A rollout's `drain requested` object (actfleet.work_queue.drain_key), read between units: the
        worker finishes what it holds, claims nothing more and exits (record "drained") so reconcile can
        replace it without abandoning a unit. An unreadable store is no request."""
        if not self.drain_requests:
            return False
        if not self.drain_seen:
            try:
                self.drain_seen = q.drain_requested(self.store, self.spec.job, self.worker_id)
            except Exception as e:
                log.warning("drain request unreadable: %s", e)
            if self.drain_seen:
                log.info("drain requested by a rollout: finishing the units held, then exiting")
        return self.drain_seen

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> WorkResult:
        try:
            result = self._run()
            self._returned = True
            return result
        except BaseException as e:
            if is_fatal(e):  # reconcile and status read why this worker stopped (the command exits non-zero)
                self.record_failure(e)
            if isinstance(e, OSError) and is_disk_full(e):
                raise one_line(e) from None
            raise
        finally:
            self._finished.set()

    def record_failure(self, e: BaseException) -> None:
        """The lasting record of why this worker stops for good: state "failed" and, for an error every retry
        would meet (bad input, a full disk), its one-line message as the reason. The process does not come
        back on this machine (systemd's RestartPreventExitStatus=2 74), so reconcile replaces it on that
        reason (infra/decide.py) and status shows it."""
        with self._record_lock:
            self.record.reason = str(one_line(e)) if isinstance(e, Exception) else None
        self._write_record("failed")

    def _run(self) -> WorkResult:
        result = WorkResult()
        self._pins()
        self._write_record("idle")
        while not self._stop_claiming():
            nxt = self._next_unit()
            if nxt is None:  # SIGTERM while the store was unavailable
                break
            if nxt.all_done:
                result.job_complete = True
                break
            if nxt.lease is None:  # everything left is leased by others: wait to take over expired leases
                self._write_record("waiting")
                self._wait_for_others(nxt.wait_seconds)
                continue
            for committed, tokens in self._stream(nxt.lease, prefetch=self.stream_units):
                if committed:
                    result.units_committed += 1
                    result.tokens += tokens
                else:
                    result.units_abandoned += 1
        result.stopped_by_signal = self.draining.is_set()
        state = "stopped" if result.stopped_by_signal else "finished"
        self._write_record("drained" if self.drain_seen and not result.job_complete else state)
        return result

    def _next_unit(self) -> "q.NextUnit | None":
        """q.next_unit, waiting out an unavailable store (a GCS outage past the client's retries, a local key
        lock held by a stalled writer) with jittered backoff capped at a third of a lease, as long as it lasts:
        the worker record is rewritten meanwhile, best effort. None if SIGTERM came while waiting."""
        delays = backoff(1.0, max(1.0, min(60.0, self.lease_seconds / 3)))
        while True:
            try:
                return q.next_unit(self.store, self.spec, self.worker_id, self.lease_seconds, offset=self.offset)
            except Exception as e:
                if not unavailable(e):
                    raise
                delay = next(delays)
                log.warning(
                    "store unavailable while claiming (%s: %s); trying again in %.1fs", type(e).__name__, e, delay
                )
            self._write_record("waiting")
            if self.draining.wait(delay):
                return None

    def _wait_for_others(self, wait_seconds: float) -> None:
        """Everything left is leased by others: wait until the earliest lease expires (to take it over), or
        until a lease we wait on is gone (committed: maybe the job is complete; or released: claimable), or
        SIGTERM. Polls the lease listing every WAIT_POLL_S. At most a third of a lease between worker records,
        as while working: reconcile's heartbeat timeout (at least one lease) must never mistake a waiting
        worker for a stalled one."""
        end = time.monotonic() + min(wait_seconds + random.uniform(0, 0.5), self.lease_seconds / 3)
        try:
            waited_on = q.leased_units(self.store, self.spec.job)
        except Exception as e:
            log.warning("listing leases failed: %s", e)
            waited_on = set()
        while (left := end - time.monotonic()) > 0:
            if self.draining.wait(min(left, WAIT_POLL_S * random.uniform(0.75, 1.25))):
                return
            try:
                if not waited_on or not waited_on <= q.leased_units(self.store, self.spec.job):
                    return  # a lease we waited on is gone (or there was none to wait on: look again)
            except Exception as e:  # an unavailable store: next_unit waits it out
                log.warning("listing leases failed: %s", e)
                return

    def _pins(self) -> dict[str, str]:
        """The input and model digests this worker computes from, checked against the job's (once)."""
        if self._pinned is None:
            input_sha256, model_sha256 = self.extractor.fingerprint(), self.extractor.model_sha256()
            q.check_input(self.spec, input_sha256)
            q.check_model(self.spec, model_sha256)
            self._pinned = {"input_sha256": input_sha256, "model_sha256": model_sha256}
        return self._pinned

    def _write_record(self, state: str, unit: int | None = None) -> None:
        with self._record_lock:
            self.record.state, self.record.current_unit = state, unit
        try:
            q.write_worker_record(self.store, self.spec.job, self.record)
        except Exception as e:
            log.warning("worker record write failed: %s", e)

    def _process(self, lease: q.Lease) -> tuple[bool, int]:
        """One unit alone (nothing prefetched): (committed, tokens). Abandons on a lost lease or failed upload."""
        return self._stream(lease, prefetch=False)[0]

    def _stream(self, first: q.Lease, *, prefetch: bool = True) -> list[tuple[bool, int]]:
        """Units through one device stream, starting with `first` and going on with every next unit that can
        be claimed at once (none free, a signal, or max_units ends it): (committed, tokens) per unit."""
        live: dict[int, _UnitRun] = {0: self._open(first)}  # by index in the stream, until finished
        newest = 0
        ahead: list[Future] = []  # the next unit being claimed and prepared (at most one at a time)
        outcomes: list[tuple[bool, int]] = []
        fatal: list[BaseException] = []  # errors that stop the worker, raised once every unit has finished

        def close_before(k: int) -> None:
            for i, run in live.items():
                if i < k:
                    run.close()

        def reap() -> None:
            for i in [i for i, run in live.items() if run.closed and run.finished.is_set()]:
                run = live.pop(i)
                outcomes.append(run.outcome)
                if run.error is not None:
                    fatal.append(run.error)

        def claim_next(older: list[_UnitRun]) -> "_UnitRun | None":
            for run in older:  # bounds the units held: one finishing, one computing, this one
                run.finished.wait()
            if self._stop_claiming():
                return None
            try:
                nxt = q.next_unit(self.store, self.spec, self.worker_id, self.lease_seconds, offset=self.offset)
            except Exception as e:
                if not unavailable(e):
                    raise
                log.warning("store unavailable while claiming ahead (%s: %s)", type(e).__name__, e)
                return None  # the stream ends with the units it has; the main loop waits the store out
            return None if nxt.lease is None else self._open(nxt.lease)

        def start_prefetch() -> None:
            if prefetch and not ahead:
                ahead.append(in_thread(claim_next, [run for i, run in live.items() if i < newest - 1]))

        def units() -> Iterator[PreparedUnit]:
            nonlocal newest
            while True:
                run = live[newest]
                if run.prepared.batches <= self.prefetch_batches:
                    start_prefetch()
                yield run.prepared
                close_before(newest)  # the stream has yielded every batch of the units before this one
                if not prefetch:
                    return
                start_prefetch()  # a no-op unless the loop never asked for it
                try:
                    nxt = ahead.pop().result()
                except BaseException as e:  # raised once the units already running have finished
                    fatal.append(e)
                    return
                if nxt is None:
                    return
                newest += 1
                live[newest] = nxt

        gen = units()
        stream = self.extractor.run_stream(gen)
        error: BaseException | None = None
        try:
            for k, batch in stream:
                close_before(k)
                run = live[k]
                run.feed(batch)
                if k == newest and run.prepared.batches - run.received <= self.prefetch_batches:
                    start_prefetch()
                reap()
                if fatal or self._past_deadline():
                    break
                if not ahead and all(r.stopping() for i, r in live.items() if i >= k):
                    break  # every unit still computing is being abandoned: stop computing for nothing
        except BaseException as e:  # the device stream failed: the units it was computing are abandoned
            error = e
        finally:
            stream.close()
            gen.close()
        if ahead:  # claimed but never streamed (the loop stopped early): give it back
            try:
                nxt = ahead.pop().result()
            except BaseException as e:
                fatal.append(e)
                nxt = None
            if nxt is not None:
                nxt.abort("stopped before it was computed")
                live[newest + 1] = nxt
        for run in live.values():
            if error is not None and not run.closed:
                run.fail(error)
            elif not run.complete():
                run.abort("stopped early")
            run.close()
        for run in live.values():
            run.finished.wait()
        reap()
        self._write_record("idle")
        if error is not None and is_fatal(error):
            fatal.insert(0, error)  # a fatal error is raised even when no unit was left to take it
        elif error is not None:
            log.warning("device stream failed: %s: %s", type(error).__name__, error)
        if fatal:
            raise fatal[0]
        return outcomes

    def _open(self, lease: q.Lease) -> "_UnitRun":
        """Start a claimed unit: its lease keeper, its serializer and uploader, its rows read and prepared."""
        self._claimed += 1
        unit = lease.unit
        self._write_record("working", unit)
        keeper = _LeaseKeeper(self.store, lease, self.lease_seconds, self.record, self.spec.job, self.healthy)
        keeper.start()
        self._held[unit] = keeper
        self.on_event("claimed", {"unit": unit, "attempt": lease.attempt})
        start, stop = self.spec.unit_range(unit)
        try:
            prepared = self.extractor.prepare(start, stop)
        except BaseException as e:
            lease = keeper.stop()
            if is_fatal(e) and isinstance(e, Exception):  # every retry would fail the same way: stop this worker
                q.release(self.store, lease)
            self._held.pop(unit, None)
            raise
        self.on_event("computing", {"unit": unit, "rows": len(prepared.rows)})
        return _UnitRun(self, lease, keeper, prepared)


class _UnitRun:
    """One claimed unit on its way to a commit: its batches go through its own serializer and uploader
    threads; once its input is closed, a finishing thread commits it (or abandons it)."""

    def __init__(self, worker: Worker, lease: q.Lease, keeper: _LeaseKeeper, prepared: PreparedUnit):
        self.w, self.lease, self.keeper, self.prepared = worker, lease, keeper, prepared
        self.unit = lease.unit
        self.t0 = time.monotonic()
        self.stats = _UnitStats(rows=prepared.rows, moments=_moments(worker.spec))
        self.batches: queue_mod.Queue = queue_mod.Queue(maxsize=worker.queue_depth)
        self.shards: queue_mod.Queue = queue_mod.Queue(maxsize=worker.queue_depth)
        self.failure: list[BaseException] = []
        self.aborted = threading.Event()
        self.abort_reason = "aborted"
        self.received = 0  # batches fed so far
        self.closed = False
        self.finished = threading.Event()
        self.outcome: tuple[bool, int] = (False, 0)
        self.error: BaseException | None = None  # fatal: the worker stops (raised by Worker._stream)
        self.threads = [
            threading.Thread(target=self._serializer, name=f"serializer-{self.unit}", daemon=True),
            threading.Thread(target=self._uploader, name=f"uploader-{self.unit}", daemon=True),
        ]
        for t in self.threads:
            t.start()

    # -- stopping -------------------------------------------------------------------------------------

    def stopping(self) -> bool:
        return self.aborted.is_set() or self.keeper.lost.is_set() or self.w._past_deadline()

    def complete(self) -> bool:
        return self.received >= self.prepared.batches

    def fail(self, e: BaseException) -> None:
        """A stage failed: remember why, and stop the other stages."""
        self.failure.append(e)
        self.aborted.set()

    def abort(self, reason: str) -> None:
        self.abort_reason = reason
        self.aborted.set()

    def _put(self, qu: queue_mod.Queue, item) -> bool:
        """Blocking put that gives up when the unit is stopping (backpressure without deadlock)."""
        while True:
            try:
                qu.put(item, timeout=0.1)
                return True
            except queue_mod.Full:
                if self.stopping():
                    return False

    def _get(self, qu: queue_mod.Queue):
        while True:
            try:
                return qu.get(timeout=0.1)
            except queue_mod.Empty:
                if self.stopping():
                    return _DONE

    # -- stages ---------------------------------------------------------------------------------------

    def feed(self, batch: Batch) -> None:
        """One batch from the device stream; dropped once the unit is being abandoned."""
        self.received += 1
        if not self.stopping():
            self._put(self.batches, batch)

    def close(self) -> None:
        """No more batches: finish (commit or abandon) in the background. Idempotent."""
        if not self.closed:
            self.closed = True
            threading.Thread(target=self._finish, name=f"finish-{self.unit}", daemon=True).start()

    def _serializer(self):
        try:
            writer = self.w.extractor.shard_writer(self.unit)
            while (batch := self._get(self.batches)) is not _DONE:
                self.stats.count(batch)
                for shard in writer.add(batch):
                    if not self._put(self.shards, shard):
                        return
            if self.stopping():
                return
            for shard in writer.finish():
                if not self._put(self.shards, shard):
                    return
        except BaseException as e:
            self.fail(e)
        finally:
            self._put(self.shards, _DONE)

    def _uploader(self):
        w, job, unit = self.w, self.w.spec.job, self.unit
        try:
            while (shard := self._get(self.shards)) is not _DONE:
                if shard.unit != unit:
                    raise ValueError(f"the shard writer for unit {unit} made {shard.name}")
                key = q.shard_key(job, unit, shard.part, self.lease.tag)
                if self.stopping():
                    return
                w.on_event("uploading", {"unit": unit, "part": shard.part})
                upload_with_retry(w.store, key, shard.data, attempts=w.upload_attempts, should_stop=self.stopping)
                self.stats.shards.append(
                    q.ShardInfo(
                        name=q.job_relative(job, key),
                        bytes=len(shard.data),
                        sha256=hashlib.sha256(shard.data).hexdigest(),
                        tokens=shard.tokens,
                    )
                )
        except BaseException as e:
            self.fail(e)

    def _check(self) -> None:
        """Raise Stop (or the fatal error) unless every batch and shard of the unit went through."""
        if self.failure and is_fatal(self.failure[0]):
            raise one_line(self.failure[0])
        if self.failure:
            raise Stop(f"{type(self.failure[0]).__name__}: {self.failure[0]}")
        if self.keeper.lost.is_set():
            raise Stop("lease lost")
        if self.w._past_deadline():
            raise Stop("drain deadline")
        if self.aborted.is_set():
            raise Stop(self.abort_reason)

    def _upload_stats(self) -> "q.ShardInfo | None":
        """The unit's statistics object, uploaded under this attempt's own name (worker/stats.py)."""
        moments = self.stats.moments
        if moments is None:
            return None
        job = self.w.spec.job
        key = q.stats_key(job, self.unit, self.lease.tag)
        data = moments.to_bytes({"job": job, "unit": str(self.unit)})
        try:
            upload_with_retry(self.w.store, key, data, attempts=self.w.upload_attempts, should_stop=self.stopping)
        except InputError:
            raise
        except Exception as e:  # failed for good, like a shard's upload: abandon the unit
            raise Stop(f"upload of {key}: {type(e).__name__}: {e}") from None
        count = max((s.count for s in moments.values()), default=0)
        return q.ShardInfo(q.job_relative(job, key), len(data), hashlib.sha256(data).hexdigest(), count)

    def _tell_abandoned(self, reason: str) -> None:
        # This runs on the finisher thread: an event handler that refuses (extract stops at the first abandoned
        # unit) must stop the worker through self.error, or its exception dies with the thread and the loop
        # claims the same unit again, forever.
        try:
            self.w.on_event("abandoned", {"unit": self.unit, "reason": reason})
        except Exception as e:
            self.error = e

    def _finish(self) -> None:
        w, unit, stats, keeper = self.w, self.unit, self.stats, self.keeper
        try:
            self._put(self.batches, _DONE)
            for t in self.threads:
                t.join()
            self._check()
            stats_info = self._upload_stats()
            record = q.DoneRecord(
                unit=unit,
                start=self.prepared.start,
                stop=self.prepared.stop,
                worker=w.worker_id,
                attempt=self.lease.attempt,
                rows_stored=len(stats.stored_ids),
                tokens=stats.tokens,
                skipped=stats.skipped(self.prepared.start, self.prepared.stop),
                shards=stats.shards,
                committed_at=time.time(),
                seconds=round(time.monotonic() - self.t0, 3),
                computed_tokens=stats.computed,
                padded_tokens=stats.padded,
                truncated=stats.truncated,
                stats=stats_info,
                **w._pins(),
            )
            w.on_event("committing", {"unit": unit})
            lease = keeper.stop()
            committed = q.commit(w.store, lease, record, w.lease_seconds)
            if committed:
                with w._record_lock:
                    w.record.units_done += 1
                    w.record.tokens += stats.tokens
                    w.record.shards += len(stats.shards)
                    w.record.bytes += sum(s.bytes for s in stats.shards)
            w.on_event("committed" if committed else "already-done", {"unit": unit, "tokens": stats.tokens})
            self.outcome = (True, stats.tokens if committed else 0)
        except (Stop, q.LeaseLost, q.ShardsMissing) as e:
            lease = keeper.stop()
            # Abandon cleanly, so the next worker need not wait for expiry. Generation-matched: a lease
            # someone else took over is never deleted.
            q.release(w.store, lease)
            log.warning("unit %d abandoned: %s", unit, e)
            self._tell_abandoned(str(e))
        except Exception as e:
            lease = keeper.stop()
            if is_fatal(e):
                # Bad input (a pinned file changed, a token id outside the vocabulary...) or a full disk: every
                # retry would fail the same way, so stop this worker (one line, exit 2 or 74) instead of
                # abandoning and reclaiming forever. Releasing the lease frees the unit (and its lease file).
                self.error = one_line(e)
            elif unavailable(e):
                # The store stopped answering during the commit: abandon (nothing is done unless the done
                # record landed, and then it stays done); the loop claims again once the store answers.
                log.warning("unit %d abandoned: store unavailable: %s: %s", unit, type(e).__name__, e)
                self._tell_abandoned(f"store unavailable: {e}")
            else:
                self.error = e
                return
            try:
                # commit() renews before it creates the done record: release the generation now in the store
                # if it is still our attempt's (same nonce), not the one the keeper last saw.
                current = q.read_lease(w.store, w.spec.job, unit)
                if current is not None and current.nonce == lease.nonce:
                    q.release(w.store, current)
            except Exception as e2:  # still unavailable: the lease expires instead
                log.warning("releasing the lease of unit %d failed: %s", unit, e2)
        except BaseException as e:
            keeper.stop()
            self.error = e
        finally:
            w._held.pop(unit, None)
            self.finished.set()


_DONE = object()  # the end of a stage's queue


@dataclass
class _UnitStats:
    rows: list[Row] = field(default_factory=list)
    stored_ids: set[int] = field(default_factory=set)
    engine_skips: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    computed: int = 0
    padded: int = 0
    truncated: int = 0
    shards: list[q.ShardInfo] = field(default_factory=list)
    moments: Any = None  # actfleet.worker.stats.UnitStats, or None when the job wants no statistics

    def count(self, batch: Batch) -> None:
        if self.moments is not None:
            self.moments.add_batch(batch)
        self.tokens += batch.stored_tokens
        self.stored_ids |= batch.stored_rows()  # context windows: the input rows behind the tokens
        self.computed += batch.computed_tokens
        self.padded += batch.padded_tokens
        self.truncated += batch.truncated
        for sid, reason in batch.skipped.items():
            self.engine_skips[int(sid)] = str(reason)

    def skipped(self, start: int, stop: int) -> dict[str, list[int]]:
        """reason -> sample ids, for every row of the unit that stored no token."""
        out: dict[str, list[int]] = {}
        reasons = {sid: reason for sid, _, reason in self.rows if reason}
        for sid in range(start, stop):
            if sid in self.stored_ids:
                continue
            reason = reasons.get(sid) or self.engine_skips.get(sid) or "no tokens stored"
            out.setdefault(reason, []).append(sid)
        return out


def _moments(spec: q.JobSpec):
    """A fresh statistics accumulator for one unit of this job, or None (--stats none)."""
    if spec.options.stats == "none":
        return None
    from actfleet.worker.stats import UnitStats

    return UnitStats(gram=spec.options.stats == "gram")


def exit_now() -> None:
    """The end of a drained process: exit 0 at once, without waiting for threads still blocked in an upload or
    an engine step, or for the interpreter's teardown (the drain watchdog, and `work` after a drain)."""
    import sys

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass

    t = threading.Thread(target=flush, name="drain-flush", daemon=True)
    t.start()
    t.join(0.5)  # a full pipe nobody reads must not keep the process alive
    os._exit(0)


def install_sigterm(worker: Worker) -> None:
    """SIGTERM / SIGINT -> drain (a second signal does not kill: the drain deadline already bounds it, and the
    watchdog ends the process DRAIN_GRACE_S after it if the loop is still blocked)."""
    if worker.on_drain_timeout is None:
        worker.on_drain_timeout = exit_now

    def handler(signum, frame):
        worker.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # Python runs `handler` in the main thread only, once it is back in the interpreter: a main thread inside an
    # engine step (XLA, C++) would start the drain, and its deadline, only when the step returns. The signal's
    # C handler writes its number to the wakeup fd at once, whichever thread it lands on: a thread reading it
    # starts the drain on time.
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread (signal.signal above would have refused already)
        os.close(r)
        os.close(w)
        return

    def watch() -> None:
        while True:
            try:
                got = os.read(r, 64)
            except OSError:
                return
            if not got:
                return
            if any(b in (signal.SIGTERM, signal.SIGINT) for b in got):
                worker.request_stop()

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()
