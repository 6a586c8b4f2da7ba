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
(release the leases so another worker takes them at once), then exit 0.
"""

from __future__ import annotations

import hashlib
import logging
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
from actfleet.errors import InputError
from actfleet.store import Store
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


def upload_with_retry(
    store: Store,
    key: str,
    data: bytes,
    *,
    attempts: int = 6,
    base: float = 0.5,
    cap: float = 20.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """store.put with jittered exponential backoff ("full jitter", actfleet.retry); raises the last error after
    `attempts`, or at once for a bad key (InputError: retrying cannot help). Any other error is retried:
    network, 5xx after the client's own retries, disk full..."""
    from actfleet.retry import retry

    return retry(
        lambda: store.put(key, data),
        attempts=attempts,
        base=base,
        cap=cap,
        fatal=(InputError,),
        should_stop=should_stop,
        on_retry=lambda err, delay, _n: log.warning("upload of %s failed (%s); retrying in %.1fs", key, err, delay),
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
    drain_seconds: float = 25.0
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

    # -- signals --------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop claiming; the units held get until drain_seconds from now."""
        if not self.draining.is_set():
            self._stop_at = time.monotonic() + self.drain_seconds
            self.draining.set()
            log.info("stop requested: draining (%.0fs)", self.drain_seconds)

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
        result = WorkResult()
        self._pins()
        self._write_record("idle")
        while not self._stop_claiming():
            nxt = q.next_unit(self.store, self.spec, self.worker_id, self.lease_seconds, offset=self.offset)
            if nxt.all_done:
                result.job_complete = True
                break
            if nxt.lease is None:  # everything left is leased by others: wait to take over expired leases
                self._write_record("waiting")
                # At most a third of a lease between records, as while working: reconcile's heartbeat
                # timeout (at least one lease, config.py) must never mistake a waiting worker for a stalled one.
                self.draining.wait(min(nxt.wait_seconds + random.uniform(0, 0.5), self.lease_seconds / 3))
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
            nxt = q.next_unit(self.store, self.spec, self.worker_id, self.lease_seconds, offset=self.offset)
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
        if error is not None and (not isinstance(error, Exception) or isinstance(error, InputError)):
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
        self.on_event("claimed", {"unit": unit, "attempt": lease.attempt})
        start, stop = self.spec.unit_range(unit)
        try:
            prepared = self.extractor.prepare(start, stop)
        except InputError:
            q.release(self.store, keeper.stop())  # every retry would fail the same way: stop this worker
            raise
        except BaseException:
            keeper.stop()
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
        self.stats = _UnitStats(rows=prepared.rows)
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
        if self.failure and (not isinstance(self.failure[0], Exception) or isinstance(self.failure[0], InputError)):
            raise self.failure[0]
        if self.failure:
            raise Stop(f"{type(self.failure[0]).__name__}: {self.failure[0]}")
        if self.keeper.lost.is_set():
            raise Stop("lease lost")
        if self.w._past_deadline():
            raise Stop("drain deadline")
        if self.aborted.is_set():
            raise Stop(self.abort_reason)

    def _finish(self) -> None:
        w, unit, stats, keeper = self.w, self.unit, self.stats, self.keeper
        try:
            self._put(self.batches, _DONE)
            for t in self.threads:
                t.join()
            self._check()
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
            w.on_event("abandoned", {"unit": unit, "reason": str(e)})
        except InputError as e:
            # Bad input (a pinned file changed, a token id outside the vocabulary...): every retry would fail
            # the same way, so stop this worker (exit 2, one line) instead of abandoning and reclaiming forever.
            q.release(w.store, keeper.stop())
            self.error = e
        except BaseException as e:
            keeper.stop()
            self.error = e
        finally:
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

    def count(self, batch: Batch) -> None:
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


def install_sigterm(worker: Worker) -> None:
    """SIGTERM / SIGINT -> drain (a second signal does not kill: the drain deadline already bounds it)."""

    def handler(signum, frame):
        worker.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
