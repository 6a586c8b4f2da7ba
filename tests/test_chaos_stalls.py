"""Workers stopped for real (SIGSTOP) past their lease, then resumed: zombies, with `verify --clean` racing them.

A stopped worker's lease expires and, where another worker is free, is taken over. When the zombie is
resumed (SIGCONT) it may still be inside an upload, or about to commit, or about to renew. Whatever it does
then, the stored output must stay exactly what one uninterrupted run stores:

- a zombie never overwrites the shards another attempt committed, and commits nothing (its lease is lost, or
  expired: `renew` refuses an expired lease);
- a done record lists exactly one attempt's shards, and they exist with the sizes and sha256 it lists;
- `verify --clean`, running the whole time, never deletes a shard a done record lists or that a live
  lease's attempt may still commit; after the workers exit, verify passes;
- every worker, zombies included, exits 0.

The stand-in extractor stamps every shard with its attempt (tests/fakes/standin_extractor.py), so two
attempts never write equal bytes: an overwrite or a mixed commit fails the sha256 checks instead of passing
by accident. The tensors compared with the reference run are a pure function of the rows.

The first tests set one such race up deterministically each (a take-over decided before a stall, an upload
held at the fake GCS server, a stall until the lease expired, a store whose listing waits for a claim, a
commit stalled after its checks); the chaos tests then stop, resume and kill workers at every phase, seeded.
Wall-clock sleeps only schedule the signals: nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.shards import read_tensors
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_chaos import REPO, Proc, actfleet_argv, assert_bitwise_equal, standin_worker

STALL_PHASES = ("computing", "uploading", "committing")
# Problems a verify may report while workers run: units not done yet, garbage (without --clean). Anything
# else (a done unit's shard missing or changed, rows wrong, a bad record) is wrong at any moment: done
# records are immutable and so must be the shards they list.
IN_FLIGHT_KINDS = {"not-done", "garbage"}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

_STARTED: list[Proc] = []


def started(proc: Proc) -> Proc:
    """Remember a worker process, so that a failing test leaves none behind (stopped or running)."""
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.p.poll() is None:
            proc.p.send_signal(signal.SIGCONT)
            proc.p.kill()
            proc.p.wait()


def event(line: str) -> tuple[str, dict]:
    kind, _, rest = line.partition(" ")
    try:
        return kind, json.loads(rest) if rest.startswith("{") else {}
    except json.JSONDecodeError:
        return kind, {}


def events(proc: Proc, kind: str) -> list[dict]:
    with proc.cond:
        lines = list(proc.lines)
    return [info for k, info in map(event, lines) if k == kind]


def tail(proc: Proc, n: int = 40) -> str:
    with proc.cond:
        return "\n".join(proc.lines[-n:])


def prepare_jobs(store, data: Path, jobs, rows: int, unit_rows: int) -> None:
    for job in jobs:
        q.prepare(
            store, job, input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows, options={}
        )


def reference_store(tmp_path: Path, data: Path, rows: int, unit_rows: int):
    """An uninterrupted in-process run of the same rows and unit size: job "ref" in its own store."""
    ref = open_store(str(tmp_path / "reference"))
    prepare_jobs(ref, data, ["ref"], rows, unit_rows)
    result = Worker(ref, q.read_job(ref, "ref"), sx.StandinExtractor(data, worker="ref"), "ref", lease_seconds=30).run()
    assert result.job_complete
    return ref


def attempt_stamps(store, job: str, unit: int) -> set[str]:
    """The attempt stamps of the shards unit's done record lists."""
    rec = q.read_done(store, job, unit)
    return {read_tensors(store.read(f"{job}/{s.name}")[0])[1].get("attempt", "") for s in rec.shards}


def assert_job_is_one_clean_run(store, job: str, ref, units: int) -> None:
    """After every worker exited: clean the last garbage, then verify passes with nothing left over, each
    done record lists one attempt's shards (its committer's), and the tensors equal the reference's."""
    verify(store, job, clean=True)
    rep = verify(store, job)
    assert rep.ok, [(p.kind, p.message) for p in rep.problems]
    assert rep.units_done == units
    listed = {f"{job}/{s.name}" for u in range(units) for s in q.read_done(store, job, u).shards}
    left = set(store.list(f"{job}/shards/")) - listed
    assert not left, f"{job}: unlisted shards survived verify --clean after every worker exited: {sorted(left)[:5]}"
    for unit in range(units):
        rec = q.read_done(store, job, unit)
        stamps = attempt_stamps(store, job, unit)
        assert len(stamps) <= 1, f"{job} unit {unit}: the done record mixes attempts' shards: {sorted(stamps)}"
        for stamp in stamps:
            assert stamp.split("/")[0] == rec.worker, (
                f"{job} unit {unit}: committed by {rec.worker} but its shards were written by attempt {stamp}"
            )
    assert_bitwise_equal(store, ref, job, units, job_b="ref")


class VerifyLoop(threading.Thread):
    """Runs `verify_once(job)` over `jobs` round and round until stopped, collecting what must never appear
    (problems other than IN_FLIGHT_KINDS, exceptions) and what clean deleted."""

    def __init__(self, verify_once, jobs, pause: float = 0.0):
        super().__init__(name="verify-loop", daemon=True)
        self.verify_once, self.jobs, self.pause = verify_once, list(jobs), pause
        self.stopped = threading.Event()
        self.passes = 0
        self.cleaned: list[str] = []
        self.bad: list[tuple[str, dict]] = []  # (job, problem)
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            for job in self.jobs:
                if self.stopped.is_set():
                    break
                try:
                    rep = self.verify_once(job)
                except Exception:
                    self.errors.append(f"{job}: {traceback.format_exc(limit=6)}")
                    continue
                self.passes += 1
                self.cleaned += rep.get("cleaned", [])
                self.bad += [(job, p) for p in rep.get("problems", []) if p["kind"] not in IN_FLIGHT_KINDS]
            self.stopped.wait(self.pause)

    def finish(self, explain=lambda job, unit: "") -> None:
        """Stop; fail on what must never be seen. `explain(job, unit)` adds what is known about a unit."""
        self.stopped.set()
        self.join(timeout=600)
        assert not self.is_alive(), "verify --clean hung"
        assert not self.errors, "verify --clean raised while workers ran:\n" + "\n".join(self.errors[:3])
        if self.bad:
            first = {}
            for job, p in self.bad:  # the first sighting of each problem, in order
                first.setdefault((job, p["kind"], p["message"]), p.get("unit"))
            lines = [f"{job}: {kind}: {message}" for (job, kind, message) in first]
            job, unit = next((job, unit) for (job, _, _), unit in first.items())
            raise AssertionError(
                f"verify --clean saw a broken done unit while workers ran "
                f"({len(self.bad)} sightings):\n" + "\n".join(lines[:10]) + f"\n{job} unit {unit}: {explain(job, unit)}"
            )
        assert self.passes > 0


def in_process_verify(store):
    return lambda job: verify(store, job, clean=True).to_dict()


def cli_verify(store_url: str, env: dict | None = None):
    """`actfleet verify --clean --json` as a subprocess (exit 1 just means problems, e.g. units not done)."""

    def once(job: str) -> dict:
        r = subprocess.run(
            actfleet_argv("verify", "--store", store_url, "--job", job, "--clean", "--json"),
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode not in (0, 1) or not r.stdout.strip():
            raise RuntimeError(f"actfleet verify --clean exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return json.loads(r.stdout)

    return once


# ----------------------------------------------------------------------------------------------------
# The scheduler: seeded stops past the lease, resumes, and kills
# ----------------------------------------------------------------------------------------------------


@dataclass
class StallChaos:
    stops: dict[str, int] = field(default_factory=lambda: {p: 0 for p in STALL_PHASES})
    kills: dict[str, int] = field(default_factory=lambda: {p: 0 for p in STALL_PHASES})
    procs: dict[str, Proc] = field(default_factory=dict)  # every worker started, by name
    killed: set[str] = field(default_factory=set)
    resumed: set[str] = field(default_factory=set)  # stopped at least once, then continued
    log: list[tuple[str, str, dict]] = field(default_factory=list)  # (action, victim, the event it hit)

    def abandoned(self) -> list[dict]:
        return [info for name in self.resumed for info in events(self.procs[name], "abandoned")]

    def story(self, store, job: str | None, unit: int | None) -> str:
        """Who committed a unit, what the scheduler did to workers on it, and each one's events on it."""

        def on_it(info: dict) -> bool:
            return info.get("unit") == unit and info.get("job", job) == job

        rec = q.read_done(store, job, unit) if job is not None and unit is not None else None
        out = [
            f"done record by {rec.worker if rec else None}, shards {[s.name for s in rec.shards] if rec else []}",
            "actions: " + "; ".join(f"{a} {v} at {e}" for a, v, e in self.log if on_it(e)),
        ]
        for name, proc in self.procs.items():
            with proc.cond:
                mine = [line for line in proc.lines if on_it(event(line)[1])]
            if mine:
                out.append(f"{name}{' (killed)' if name in self.killed else ''}: " + " | ".join(mine))
        return "\n".join(out)


def run_stall_chaos(
    start_worker,
    *,
    workers: int,
    stops: int,
    kills: int,
    lease_s: float,
    seed: int,
    max_stopped: int = 2,
    stall: tuple[float, float] = (2.0, 3.0),
    then_sigterm: bool = False,
) -> StallChaos:
    """Keep `workers` processes running. In a seeded order of `stops` stops and `kills` kills, the k-th
    action hits the first worker (in a seeded order) that is not stopped and reaches phase
    STALL_PHASES[k % 3] from then on, after a short seeded delay: a stop SIGSTOPs it for a seeded
    `stall` multiple of the lease (at most `max_stopped` workers are stopped at a time), then SIGCONTs it;
    a kill SIGKILLs it and starts a replacement. When a worker exits on its own (the work is complete),
    the remaining actions are dropped. Every stopped worker is resumed (when its stall is over), and every
    worker not killed must exit 0: on its own, or, with `then_sigterm`, drained by a SIGTERM sent once
    the actions are done and every stall is over (the rest of the work is then left to others)."""
    rng = random.Random(seed)
    actions = ["stop"] * stops + ["kill"] * kills
    rng.shuffle(actions)
    out = StallChaos()
    live: dict[str, Proc] = {}
    seen: dict[str, int] = {}
    stopped: dict[str, float] = {}  # name -> when to resume (monotonic)
    exited = False
    deadline = time.monotonic() + 480  # a safety net against a hung test, not an assertion

    def spawn() -> None:
        name = f"stall-{len(out.procs)}"
        out.procs[name] = live[name] = started(start_worker(name))
        seen[name] = 0

    def poll() -> list[tuple[str, list[str]]]:
        """Resume the workers due; new lines of every running worker (in a seeded order); reap exits."""
        nonlocal exited
        now = time.monotonic()
        for name, due in list(stopped.items()):
            if due <= now:
                live[name].p.send_signal(signal.SIGCONT)
                out.resumed.add(name)
                del stopped[name]
        fresh = []
        for name in sorted(live, key=lambda _: rng.random()):
            proc = live[name]
            with proc.cond:
                new = proc.lines[seen[name] :]
                seen[name] = len(proc.lines)
            if "<eof>" in new:
                assert proc.p.wait(timeout=60) == 0, f"{name} failed:\n{tail(proc)}"
                del live[name]
                stopped.pop(name, None)  # it exited just before its SIGSTOP landed
                exited = True
                continue
            if name not in stopped:
                fresh.append((name, new))
        return fresh

    for _ in range(workers):
        spawn()
    for k, action in enumerate(actions):
        phase = STALL_PHASES[k % len(STALL_PHASES)]
        victim = None
        while victim is None and not exited and time.monotonic() < deadline:
            fresh = poll()
            if action == "stop" and len(stopped) >= max_stopped:
                time.sleep(0.01)
                continue
            hit = next(((name, s) for name, new in fresh for s in new if s.startswith(phase + " ")), None)
            if hit is None:
                time.sleep(0.005)
            else:
                victim = hit[0]
                out.log.append((action, victim, event(hit[1])[1]))
        if victim is None:
            break
        time.sleep(rng.uniform(0, 0.03))
        proc = live[victim]
        if action == "stop":
            proc.p.send_signal(signal.SIGSTOP)
            stopped[victim] = time.monotonic() + rng.uniform(*stall) * lease_s
            out.stops[phase] += 1
        else:
            proc.p.kill()
            proc.p.wait()
            del live[victim]
            out.killed.add(victim)
            out.kills[phase] += 1
            spawn()
    while stopped and time.monotonic() < deadline:  # every zombie is resumed when its stall is over
        poll()
        time.sleep(0.01)
    for name, due in list(stopped.items()):
        live[name].p.send_signal(signal.SIGCONT)
        out.resumed.add(name)
    if then_sigterm:
        for proc in live.values():  # a replacement still importing would die of it: wait until it can drain
            proc.wait_for(lambda s: s.startswith("started"), timeout=60)
            proc.p.send_signal(signal.SIGTERM)
    for name, proc in live.items():
        try:
            rc = proc.p.wait(timeout=max(60.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.p.kill()
            rc = "hung"
        assert rc == 0, f"{name} exited {rc}:\n{tail(proc)}"
    return out


# ----------------------------------------------------------------------------------------------------
# The stand-in's attempt stamp
# ----------------------------------------------------------------------------------------------------


def test_the_standin_stamps_each_attempt_and_keeps_its_tensors(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 12)
    ex = sx.StandinExtractor(data, worker="w1")
    rows = list(ex.rows(0, 12))
    blobs = []
    for _ in range(2):  # two attempts at unit 0 in one process
        writer = ex.shard_writer(0)
        shards = [s for b in ex.run(rows) for s in writer.add(b)] + writer.finish()
        blobs.append([s.data for s in shards])
    other = sx.StandinExtractor(data, worker="w2").shard_writer(0)
    assert len(blobs[0]) == len(blobs[1]) > 1
    for a, b in zip(*blobs):
        assert a != b  # every attempt writes its own bytes...
        (ta, ma), (tb, mb) = read_tensors(a), read_tensors(b)
        assert ma["attempt"] != mb["attempt"] and ma["attempt"].startswith("w1/")
        assert sorted(ta) == sorted(tb) and all(ta[k].tobytes() == tb[k].tobytes() for k in ta)  # ...same tensors
    assert other.attempt.startswith("w2/") and other.attempt.split("/")[1] == sx.PROCESS_NONCE


# ----------------------------------------------------------------------------------------------------
# One race, set up deterministically
# ----------------------------------------------------------------------------------------------------


def test_a_take_over_decided_before_a_stall_fails_once_another_worker_took_over(tmp_path):
    """Two workers read the same expired lease; one stalls (SIGSTOP, a GC pause) before its take-over while
    the other takes the unit over and renews. The stalled take-over, decided on the stale read, must fail
    and leave the winner's lease alone (the clocks are given explicitly: no waiting)."""
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(store, "job", input="x", fingerprint="0" * 64, rows=1, unit_rows=1, options={})
    assert q.claim(store, "job", 0, "worker-a", 1.0, now=1000.0) is not None  # then worker-a died
    stale = q.read_lease(store, "job", 0)  # what both racers read: expired from 1001 on
    won = q.take_over(store, stale, "worker-b", 30.0, now=2000.0)
    assert won is not None
    won = q.renew(store, won, 30.0, now=2001.0)
    assert q.take_over(store, stale, "worker-c", 30.0, now=2002.0) is None  # worker-c resumes: too late
    cur = q.read_lease(store, "job", 0)
    assert (cur.worker, cur.nonce, cur.generation) == ("worker-b", won.nonce, won.generation)
    q.renew(store, won, 30.0, now=2003.0)  # still worker-b's


@pytest.mark.slow
def test_a_zombie_upload_landing_after_another_attempt_committed_changes_nothing(tmp_path, fake_gcs, monkeypatch):  # noqa: F811
    """Worker A's first shard upload is held at the (fake) GCS server and A is stopped; B takes the expired
    lease over and commits the unit; then A's held write lands and A resumes. A's late write must not touch
    what B committed, and A must commit nothing and exit 0."""
    data = sx.write_dataset(tmp_path / "data.jsonl", 16)
    ref = reference_store(tmp_path, data, 16, 16)
    store = open_store("gs://stall-bucket/zombie")
    prepare_jobs(store, data, ["job"], 16, 16)

    arrived, release, landed = threading.Event(), threading.Event(), threading.Event()
    real_write = fake_gcs.write

    def write(bucket, name, body, content_type, query):
        if "/shards/" in name and not arrived.is_set():  # the first shard write (A's): hold it
            arrived.set()
            release.wait(120)
            try:
                return real_write(bucket, name, body, content_type, query)
            finally:
                landed.set()
        return real_write(bucket, name, body, content_type, query)

    monkeypatch.setattr(fake_gcs, "write", write)
    a = started(standin_worker(store.url, "job", "worker-a", data, 0.05, 1.0, 25))
    assert arrived.wait(120), tail(a)
    a.p.send_signal(signal.SIGSTOP)  # its lease now expires: nobody renews it
    try:
        b = started(standin_worker(store.url, "job", "worker-b", data, 0.0, 1.0, 25))
        assert b.p.wait(timeout=120) == 0, tail(b)
        assert [e["unit"] for e in events(b, "committed")] == [0], tail(b)
        committed = {s.name: s.sha256 for s in q.read_done(store, "job", 0).shards}
        release.set()
        assert landed.wait(120)  # A's write is carried out now, after B's commit
    finally:
        release.set()
        a.p.send_signal(signal.SIGCONT)
    assert a.p.wait(timeout=120) == 0, tail(a)
    assert events(a, "committed") == [], tail(a)
    rec = q.read_done(store, "job", 0)
    assert rec.worker == "worker-b" and {s.name: s.sha256 for s in rec.shards} == committed
    rep = verify(store, "job")  # before any clean: B's shards are intact
    assert not [p for p in rep.problems if p.kind != "garbage"], [(p.kind, p.message) for p in rep.problems]
    assert_job_is_one_clean_run(store, "job", ref, 1)


def stamp_of(store, key: str) -> str:
    return read_tensors(store.read(key)[0])[1]["attempt"]


@pytest.mark.slow
@pytest.mark.parametrize("clean_at", ["now", "an hour after expiry"])
def test_a_worker_resumed_after_its_lease_expired_commits_nothing_of_that_attempt(tmp_path, clean_at):
    """A is stopped mid-unit (part 0 uploaded) until its lease has expired, with nobody there to take it
    over; `verify --clean` runs (now, or with a clock an hour ahead: it keeps the shards of a unit not done
    either way); A resumes. The stalled attempt must commit nothing (renewing its expired lease is refused), in
    particular no done record listing shards that clean removed; A redoes the unit and exits 0."""
    data = sx.write_dataset(tmp_path / "data.jsonl", 16)
    ref = reference_store(tmp_path, data, 16, 16)
    store = open_store(str(tmp_path / "bucket"))
    prepare_jobs(store, data, ["job"], 16, 16)
    a = started(standin_worker(store.url, "job", "worker-a", data, 0.3, 1.0, 25))  # 4 batches of 0.3 s, a shard each
    try:
        assert a.wait_for(lambda s: s.startswith("uploading ") and event(s)[1].get("part") == 1), tail(a)
        a.p.send_signal(signal.SIGSTOP)  # part 0 is uploaded (parts upload in order)
        uploaded = list(store.list("job/shards/"))
        assert uploaded, "part 0 of A's attempt is in the store"
        stalled = stamp_of(store, uploaded[0])
        lease = q.read_lease(store, "job", 0)
        while time.time() < lease.expires + 0.5:  # scheduling only: wait until the lease has expired
            time.sleep(0.05)
        when = time.time() if clean_at == "now" else lease.expires + 3600
        rep = verify(store, "job", clean=True, now=when)
        assert not [p for p in rep.problems if p.kind not in IN_FLIGHT_KINDS], rep.problems
        # Whatever clean's clock says, the unit is not done, so the stalled attempt's shards stay.
        assert not set(uploaded) & set(rep.cleaned), (rep.cleaned, rep.kept)
    finally:
        a.p.send_signal(signal.SIGCONT)
    assert a.p.wait(timeout=120) == 0, tail(a)
    assert events(a, "abandoned"), f"the stalled attempt carried on as if its lease had not expired:\n{tail(a)}"
    assert stalled not in attempt_stamps(store, "job", 0), "the attempt that stalled past its lease committed"
    assert_job_is_one_clean_run(store, "job", ref, 1)


class ListingHook:
    """A store whose first listing of `prefix` runs `hook()` first (everything else passes through)."""

    def __init__(self, store, prefix: str, hook):
        self._store, self._prefix, self._hook, self._fired = store, prefix, hook, False

    def list(self, prefix: str):
        if prefix == self._prefix and not self._fired:
            self._fired = True
            self._hook()
        return self._store.list(prefix)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.slow
def test_clean_racing_a_claim_never_deletes_the_new_attempts_shards(tmp_path):
    """verify --clean starts while no one holds the unit; before it lists the shards, worker A claims the
    unit, uploads part 0 and is stopped (its lease stays live). Clean must leave A's shard alone; A resumes
    and commits, and the job verifies."""
    data = sx.write_dataset(tmp_path / "data.jsonl", 16)
    ref = reference_store(tmp_path, data, 16, 16)
    store = open_store(str(tmp_path / "bucket"))
    prepare_jobs(store, data, ["job"], 16, 16)
    procs: list[Proc] = []
    present: list[str] = []

    def claim_and_upload_in_between():
        a = started(standin_worker(store.url, "job", "worker-a", data, 0.3, 10.0, 25))
        procs.append(a)
        assert a.wait_for(lambda s: s.startswith("uploading ") and event(s)[1].get("part") == 1), tail(a)
        a.p.send_signal(signal.SIGSTOP)
        present.extend(store.list("job/shards/"))

    rep = verify(ListingHook(store, "job/shards/", claim_and_upload_in_between), "job", clean=True)
    try:
        assert procs and present, "the hook ran and part 0 of A's attempt was in the store"
        gone = [k for k in present if store.generation(k) is None]
        assert not gone, (
            f"verify --clean deleted {gone}, a shard of the attempt holding a live lease (cleaned: {rep.cleaned})"
        )
    finally:
        for a in procs:
            a.p.send_signal(signal.SIGCONT)
    a = procs[0]
    assert a.p.wait(timeout=120) == 0, tail(a)
    assert [e["unit"] for e in events(a, "committed")] == [0], tail(a)
    assert_job_is_one_clean_run(store, "job", ref, 1)


class CreateHook:
    """A store whose first create of `key` runs `hook()` first (everything else passes through)."""

    def __init__(self, store, key: str, hook):
        self._store, self._key, self._hook, self._fired = store, key, hook, False

    def create(self, key: str, data: bytes) -> int:
        if key == self._key and not self._fired:
            self._fired = True
            self._hook()
        return self._store.create(key, data)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.slow
def test_a_commit_stalled_after_its_checks_loses_no_shard_to_clean(tmp_path):
    """Worker A's commit passes its checks (lease renewed, every shard there) and stalls just before it
    creates the done record, past its lease: B takes the unit over and `verify --clean` runs; then A's
    create lands. The done record A created lists A's shards, so clean must not have deleted them: nothing
    tells clean that A can no longer commit (the done record is conditioned on its absence alone)."""
    data = sx.write_dataset(tmp_path / "data.jsonl", 16)
    ref = reference_store(tmp_path, data, 16, 16)
    store = open_store(str(tmp_path / "bucket"))
    prepare_jobs(store, data, ["job"], 16, 16)
    reports = []

    def stall_past_the_lease():  # runs in A's commit, after its renewal and shard checks
        lease = q.read_lease(store, "job", 0)
        while time.time() < lease.expires + 0.2:  # scheduling only: A stalls past its lease
            time.sleep(0.05)
        assert q.take_over(store, lease, "worker-b", 30.0) is not None  # B now holds the unit
        reports.append(verify(store, "job", clean=True))

    a = Worker(
        CreateHook(store, q.done_key("job", 0), stall_past_the_lease),
        q.read_job(store, "job"),
        sx.StandinExtractor(data, worker="worker-a"),
        "worker-a",
        lease_seconds=1.0,
    )
    result = a.run()
    assert reports, "A's commit reached the done record"
    rec = q.read_done(store, "job", 0)
    assert rec is not None and rec.worker == "worker-a" and result.units_committed == 1  # A's create landed
    gone = [s.name for s in rec.shards if store.generation(f"job/{s.name}") is None]
    assert not gone, (
        f"verify --clean deleted {gone}, shards of the attempt whose done record then landed "
        f"(cleaned {reports[0].cleaned}, kept {getattr(reports[0], 'kept', None)})"
    )
    q.release(store, q.read_lease(store, "job", 0))  # B's lease (B itself never ran)
    assert_job_is_one_clean_run(store, "job", ref, 1)


# ----------------------------------------------------------------------------------------------------
# Chaos over the stand-in: filesystem and GCS stores
# ----------------------------------------------------------------------------------------------------

ROWS, UNIT_ROWS = 64, 8  # 8 units a job, 2 batches (and about 2 shards) a unit
LEASE_S = 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["filesystem", "gcs"])
def test_chaos_with_stalls_over_the_standin(tmp_path, kind, request):
    """4 stand-in workers go through a list of small jobs (each job's end is where expired leases are taken
    over; a zombie of one job is often resumed in the next), hit by 25 seeded SIGSTOPs of 2-3 leases (1 s)
    in computing/uploading/committing and 4 SIGKILLs, while verify --clean loops over the jobs. Then the
    workers are drained with SIGTERM and two unhurried workers finish the list. Every worker exits 0,
    every job verifies and equals the uninterrupted reference bit for bit."""
    if kind == "gcs":
        request.getfixturevalue("fake_gcs")  # started, with STORAGE_EMULATOR_HOST set for the children too
        store = open_store("gs://stall-bucket/chaos")
    else:
        store = open_store(str(tmp_path / "bucket"))
    names = [f"job-{i:02d}" for i in range(24)]  # more than the actions take (about 12): finishers do the rest
    data = sx.write_dataset(tmp_path / "data.jsonl", ROWS, bad_every=13, empty_every=17)
    ref = reference_store(tmp_path, data, ROWS, UNIT_ROWS)
    prepare_jobs(store, data, names, ROWS, UNIT_ROWS)
    from tests.fakes.lease_audit import AUDIT_ENV, takeover_violations

    audit = {AUDIT_ENV: str(tmp_path / "takeovers.jsonl")}  # which stale lease each take-over replaced
    loop = VerifyLoop(in_process_verify(store), names, pause=0.05)
    loop.start()
    try:
        chaos = run_stall_chaos(
            lambda name: standin_worker(store.url, ",".join(names), name, data, 0.2, LEASE_S, 25, env=audit),
            workers=4,
            stops=25,
            kills=4,
            lease_s=LEASE_S,
            seed=23,
            then_sigterm=True,
        )
        finishers = [
            started(standin_worker(store.url, ",".join(names), f"finisher-{i}", data, 0.0, LEASE_S, 25))
            for i in range(2)
        ]
        for f in finishers:
            assert f.p.wait(timeout=300) == 0, tail(f)
    finally:
        loop.stopped.set()
    loop.finish(lambda job, unit: chaos.story(store, job, unit))
    print(
        f"stops {chaos.stops} kills {chaos.kills} zombie abandons {len(chaos.abandoned())} "
        f"verify passes {loop.passes} cleaned {len(loop.cleaned)}; last action in {chaos.log[-1][2].get('job')}"
    )
    assert sum(chaos.stops.values()) == 25 and all(chaos.stops.values()), (chaos.stops, chaos.log[-1])
    assert sum(chaos.kills.values()) == 4, chaos.kills
    assert chaos.abandoned(), "no resumed worker ever found its lease lost: the stalls made no zombie"
    assert not takeover_violations(tmp_path / "takeovers.jsonl")  # tests/test_chaos_takeover.py forces the race
    for job in names:
        assert_job_is_one_clean_run(store, job, ref, ROWS // UNIT_ROWS)


# ----------------------------------------------------------------------------------------------------
# Chaos with the real engine: `actfleet work` on a tiny model, compared with `actfleet extract`
# ----------------------------------------------------------------------------------------------------


def job_rows(store, job: str, units: int) -> dict[str, np.ndarray]:
    """Every row the job stores (through its done records), sorted by (sample_id, position)."""
    parts = [
        read_tensors(store.read(f"{job}/{s.name}")[0])[0]
        for u in range(units)
        for s in q.read_done(store, job, u).shards
    ]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((out["positions"], out["sample_ids"]))
    return {k: v[order] for k, v in out.items()}


@pytest.mark.slow
def test_chaos_with_stalls_and_the_real_engine_matches_extract(tmp_path):
    """4 `actfleet work` processes on a tiny random Qwen2 (lease 2 s), 6 seeded SIGSTOPs of 2-3 leases and
    2 SIGKILLs, while `actfleet verify --clean` loops; then verify passes and every stored row (token id and
    each site, per sample and position) is bit-identical to `actfleet extract` over the same unit size."""
    from actfleet.demo.tiny_model import make_tiny_model
    from actfleet.hashing import sha256_file
    from actfleet.job_options import JobOptions
    from actfleet.worker.engine_extractor import count_input_rows
    from actfleet.worker.reader import load

    model = make_tiny_model(tmp_path / "model", seed=3)
    data = tmp_path / "data.jsonl"
    rng = random.Random(11)
    words = "the fox grid answer shard token lease unit worker bucket".split()
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}) + "\n"
            for _ in range(3000)
        )
    )  # 1,000 units: enough work to outlast the stalls
    env = {"ACTFLEET_JAX_CACHE": str(tmp_path / "jax-cache")}  # restarted workers reuse compiled programs
    opts = JobOptions(
        model=str(model),
        sites=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
        positions="non-special",
        compute_dtype="bfloat16",
        store_dtype="bfloat16",
        shard_mb=0.002,
    )  # tiny shards: several parts per unit
    unit_rows = 3
    store_dir = tmp_path / "bucket"
    store = open_store(str(store_dir))
    spec, _ = q.prepare(
        store,
        "job",
        input=str(data),
        fingerprint=sha256_file(data),
        rows=count_input_rows(str(data), opts),
        unit_rows=unit_rows,
        options=opts,
    )

    # The same rows through `actfleet extract`, with every option the job pinned (first: it warms the cache).
    out = tmp_path / "extract"
    o = spec.options
    e = subprocess.run(
        actfleet_argv(
            "extract",
            "--model",
            o.model,
            "--revision",
            o.revision,
            "--input",
            str(data),
            "--out",
            str(out),
            "--format",
            o.format,
            "--text-field",
            o.text_field,
            "--messages-field",
            o.messages_field,
            "--arc-augmentations",
            str(o.arc_augmentations),
            "--arc-seed",
            str(o.arc_seed),
            "--sites",
            ",".join(o.sites),
            "--positions",
            o.positions,
            "--compute-dtype",
            o.compute_dtype,
            "--store-dtype",
            o.store_dtype,
            "--max-seq",
            str(o.max_seq),
            "--long-inputs",
            o.long_inputs,
            "--batch-tokens",
            str(o.batch_tokens),
            "--shard-mb",
            str(o.shard_mb),
            "--unit-rows",
            str(spec.unit_rows),
            "--json",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert e.returncode == 0, e.stderr[-3000:]
    summary = json.loads(e.stdout)

    loop = VerifyLoop(cli_verify(str(store_dir), env), ["job"], pause=0.5)
    loop.start()
    try:
        chaos = run_stall_chaos(
            lambda name: Proc(
                actfleet_argv(
                    "work", "--store", str(store_dir), "--job", "job", "--worker-id", name, "--lease-seconds", "2"
                ),
                env=env,
            ),
            workers=4,
            stops=6,
            kills=2,
            lease_s=2.0,
            seed=31,
        )
    finally:
        loop.stopped.set()
    loop.finish(lambda job, unit: chaos.story(store, job, unit))
    print(
        f"stops {chaos.stops} kills {chaos.kills} zombie abandons {len(chaos.abandoned())} "
        f"verify passes {loop.passes} cleaned {len(loop.cleaned)}; last action on unit {chaos.log[-1][2].get('unit')}"
    )
    assert sum(chaos.stops.values()) == 6 and all(chaos.stops.values()), (chaos.stops, chaos.log)
    assert sum(chaos.kills.values()) == 2, chaos.kills

    verify(store, "job", clean=True)
    rep = verify(store, "job")
    assert rep.ok, [(p.kind, p.message) for p in rep.problems]
    assert rep.units_done == spec.units
    got, want = job_rows(store, "job", spec.units), load(str(out))
    assert sorted(got) == sorted(want) == sorted(("sample_ids", "positions", "token_ids", *o.sites))
    assert rep.tokens == summary["stored_tokens"] == len(want["sample_ids"])
    for name in ("sample_ids", "positions", "token_ids", *o.sites):
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), f"{name} differs from actfleet extract"
