"""`actfleet work`: claim a unit, extract it, upload its shards, commit; repeat until the job is done.

One unit at a time flows through three stages joined by queues of fixed depth, so memory stays bounded
whatever the dataset size and a slow store slows the device loop down instead of piling up bytes:

    device loop (engine.run over the unit's rows) --batches--> serializer (ShardWriter) --shards--> uploader

A heartbeat thread renews the unit's lease (generation-matched) and writes this worker's record. If the
lease is lost, the unit stops and nothing is committed. If an upload still fails after retries with
jittered backoff, the unit is abandoned (lease released) and never marked done. The done record is created
only after every shard is uploaded.

SIGTERM (a spot TPU's ~30 s notice): stop claiming; keep going on the current unit only while it can still
commit before `drain_seconds` have passed, else abandon it (release the lease so another worker takes it
at once), then exit 0.
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from actfleet.errors import InputError
from actfleet import work_queue as q
from actfleet.store import Store

if TYPE_CHECKING:
    from actfleet.worker.shards import Shard

log = logging.getLogger("actfleet.work")

Row = tuple[int, "str | None", "str | None"]  # (sample_id, text, skip_reason)


class UnitExtractor(Protocol):
    """What the loop needs from the extractor, built once per worker from the job's options."""

    def fingerprint(self) -> str:
        """sha256 of the input bytes this extractor reads (compared with the job's)."""

    def model_sha256(self) -> str:
        """The digest of the model files it loaded (worker/pinning.py; "" when the job pins no model)."""

    def rows(self, start: int, stop: int) -> Iterator[Row]:
        """The unit's input rows, sample ids start..stop-1."""

    def run(self, rows: list[Row]) -> Iterator[Any]:
        """Batches of stored tokens (numpy token_ids, sample_ids, positions, acts) for these rows."""

    def shard_writer(self, unit: int) -> "ShardSink":
        """A fresh serializer for one unit."""


class ShardSink(Protocol):
    """Shards come out in part order, each with the token count its writer already knows."""

    def add(self, batch: Any) -> "list[Shard]":
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


def upload_with_retry(store: Store, key: str, data: bytes, *, attempts: int = 6, base: float = 0.5,
                      cap: float = 20.0, should_stop: Callable[[], bool] = lambda: False) -> int:
    """store.put with jittered exponential backoff ("full jitter", actfleet.retry); raises the last error after
    `attempts`, or at once for a bad key (InputError: retrying cannot help). Any other error is retried:
    network, 5xx after the client's own retries, disk full..."""
    from actfleet.retry import retry

    return retry(lambda: store.put(key, data), attempts=attempts, base=base, cap=cap, fatal=(InputError,),
                 should_stop=should_stop, on_retry=lambda err, delay, _n: log.warning(
                     "upload of %s failed (%s); retrying in %.1fs", key, err, delay))


class _LeaseKeeper(threading.Thread):
    """Renews the lease every lease_seconds/3 and writes the worker record; flags a lost lease."""

    def __init__(self, store: Store, lease: q.Lease, lease_seconds: float, record: q.WorkerProgress, job: str,
                 healthy: Callable[[], bool] = lambda: True):
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
    _stop_at: float | None = field(default=None, init=False)  # monotonic deadline once SIGTERM arrived
    record: q.WorkerProgress = field(init=False)

    def __post_init__(self):
        self.record = q.WorkerProgress(self.worker_id, state="starting", started_at=time.time())
        self.offset = zlib.crc32(self.worker_id.encode()) % max(1, self.spec.units)
        self.draining = threading.Event()
        self._pinned: dict[str, str] | None = None

    # -- signals --------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop claiming; the current unit gets until drain_seconds from now."""
        if not self.draining.is_set():
            self._stop_at = time.monotonic() + self.drain_seconds
            self.draining.set()
            log.info("stop requested: draining (%.0fs)", self.drain_seconds)

    def _past_deadline(self) -> bool:
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> WorkResult:
        result = WorkResult()
        self._pins()
        self._write_record("idle")
        while not self.draining.is_set():
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
            committed, tokens = self._process(nxt.lease)
            if committed:
                result.units_committed += 1
                result.tokens += tokens
            else:
                result.units_abandoned += 1
        result.stopped_by_signal = self.draining.is_set()
        self._write_record("stopped" if result.stopped_by_signal else "finished")
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
        self.record.state, self.record.current_unit = state, unit
        try:
            q.write_worker_record(self.store, self.spec.job, self.record)
        except Exception as e:
            log.warning("worker record write failed: %s", e)

    def _process(self, lease: q.Lease) -> tuple[bool, int]:
        """One unit: (committed, tokens). Never raises for a lost lease or a failed upload: abandons."""
        job, unit = self.spec.job, lease.unit
        start, stop = self.spec.unit_range(unit)
        t0 = time.monotonic()
        self._write_record("working", unit)
        keeper = _LeaseKeeper(self.store, lease, self.lease_seconds, self.record, job, self.healthy)
        keeper.start()
        self.on_event("claimed", {"unit": unit, "attempt": lease.attempt})
        try:
            stats = self._extract_and_upload(unit, start, stop, keeper, lease.tag)
            if keeper.lost.is_set():
                raise Stop("lease lost")
            if self._past_deadline():
                raise Stop("drain deadline")
            record = q.DoneRecord(unit=unit, start=start, stop=stop, worker=self.worker_id, attempt=lease.attempt,
                                  rows_stored=len(stats.stored_ids), tokens=stats.tokens,
                                  skipped=stats.skipped(start, stop), shards=stats.shards,
                                  committed_at=time.time(), seconds=round(time.monotonic() - t0, 3),
                                  computed_tokens=stats.computed, padded_tokens=stats.padded,
                                  truncated=stats.truncated,
                                  **self._pins())
            self.on_event("committing", {"unit": unit})
            lease = keeper.stop()
            committed = q.commit(self.store, lease, record, self.lease_seconds)
            if committed:
                self.record.units_done += 1
                self.record.tokens += stats.tokens
                self.record.shards += len(stats.shards)
                self.record.bytes += sum(s.bytes for s in stats.shards)
            self.on_event("committed" if committed else "already-done", {"unit": unit, "tokens": stats.tokens})
            self._write_record("idle")
            return True, stats.tokens if committed else 0
        except (Stop, q.LeaseLost, q.ShardsMissing) as e:
            lease = keeper.stop()
            # Abandon cleanly, so the next worker need not wait for expiry. Generation-matched: a lease
            # someone else took over is never deleted.
            q.release(self.store, lease)
            log.warning("unit %d abandoned: %s", unit, e)
            self.on_event("abandoned", {"unit": unit, "reason": str(e)})
            self._write_record("idle")
            return False, 0
        except InputError:
            # Bad input (a pinned file changed, a token id outside the vocabulary...): every retry would fail
            # the same way, so stop this worker (exit 2, one line) instead of abandoning and reclaiming forever.
            q.release(self.store, keeper.stop())
            raise
        except BaseException:
            keeper.stop()
            raise

    def _extract_and_upload(self, unit: int, start: int, stop: int, keeper: _LeaseKeeper,
                            attempt: str) -> "_UnitStats":
        """The three-stage pipeline for one unit, writing this attempt's shard names. Raises Stop when the
        unit must be abandoned."""
        stats = _UnitStats()
        batches: queue_mod.Queue = queue_mod.Queue(maxsize=self.queue_depth)
        shards: queue_mod.Queue = queue_mod.Queue(maxsize=self.queue_depth)
        failure: list[BaseException] = []
        abort = threading.Event()
        done_token = object()

        def should_stop() -> bool:
            return abort.is_set() or keeper.lost.is_set() or self._past_deadline()

        def fail(e: BaseException) -> None:
            """A stage failed: remember why, and stop the other stages."""
            failure.append(e)
            abort.set()

        def put(qu: queue_mod.Queue, item) -> bool:
            """Blocking put that gives up when the unit is stopping (backpressure without deadlock)."""
            while True:
                try:
                    qu.put(item, timeout=0.1)
                    return True
                except queue_mod.Full:
                    if should_stop():
                        return False

        def get(qu: queue_mod.Queue):
            while True:
                try:
                    return qu.get(timeout=0.1)
                except queue_mod.Empty:
                    if should_stop():
                        return done_token

        def serializer():
            try:
                writer = self.extractor.shard_writer(unit)
                while (batch := get(batches)) is not done_token:
                    stats.count(batch)
                    for shard in writer.add(batch):
                        if not put(shards, shard):
                            return
                if should_stop():
                    return
                for shard in writer.finish():
                    if not put(shards, shard):
                        return
            except BaseException as e:
                fail(e)
            finally:
                put(shards, done_token)

        def uploader():
            try:
                while (shard := get(shards)) is not done_token:
                    if shard.unit != unit:
                        raise ValueError(f"the shard writer for unit {unit} made {shard.name}")
                    key = q.shard_key(self.spec.job, unit, shard.part, attempt)
                    if should_stop():
                        return
                    self.on_event("uploading", {"unit": unit, "part": shard.part})
                    upload_with_retry(self.store, key, shard.data, attempts=self.upload_attempts,
                                      should_stop=should_stop)
                    stats.shards.append(q.ShardInfo(name=q.job_relative(self.spec.job, key), bytes=len(shard.data),
                                                    sha256=hashlib.sha256(shard.data).hexdigest(),
                                                    tokens=shard.tokens))
            except BaseException as e:
                fail(e)

        threads = [threading.Thread(target=serializer, name="serializer", daemon=True),
                   threading.Thread(target=uploader, name="uploader", daemon=True)]
        for t in threads:
            t.start()
        rows = list(self.extractor.rows(start, stop))
        stats.rows = rows
        self.on_event("computing", {"unit": unit, "rows": len(rows)})
        try:
            for batch in self.extractor.run(rows):
                if should_stop() or not put(batches, batch):
                    break
        except BaseException as e:
            fail(e)
        finally:
            put(batches, done_token)
            for t in threads:
                t.join()
        if failure and (not isinstance(failure[0], Exception) or isinstance(failure[0], InputError)):
            raise failure[0]
        if failure:
            raise Stop(f"{type(failure[0]).__name__}: {failure[0]}")
        if keeper.lost.is_set():
            raise Stop("lease lost")
        if self._past_deadline():
            raise Stop("drain deadline")
        if abort.is_set():
            raise Stop("aborted")
        return stats


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

    def count(self, batch: Any) -> None:
        ids = batch.sample_ids
        self.tokens += int(len(ids))
        rows = getattr(batch, "source_rows", None)  # context windows: the input rows behind the tokens
        self.stored_ids.update(int(i) for i in set((ids if rows is None else rows).tolist()))
        self.computed += int(getattr(batch, "computed_tokens", 0) or 0)
        self.padded += int(getattr(batch, "padded_tokens", 0) or 0)
        self.truncated += int(getattr(batch, "truncated", 0) or 0)
        for sid, reason in (getattr(batch, "skipped", None) or {}).items():
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
