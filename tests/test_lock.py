"""The reconcile lock, against real processes, on the filesystem store and on an enforcing fake GCS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from actfleet.infra.lock import LOCK_KEY, LockHeld, LockInfo, ReconcileLock
from actfleet.store import open_store
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (pytest fixture)

ROOT = Path(__file__).resolve().parents[1]

HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from actfleet.infra.lock import ReconcileLock, LockHeld
    from actfleet.store import open_store
    store_url, hold_s = sys.argv[1], float(sys.argv[2])
    lock = ReconcileLock(open_store(store_url), command="test holder")
    try:
        lock.acquire(wait=len(sys.argv) > 3)
    except LockHeld as e:
        print("HELD", e, flush=True)
        sys.exit(0)
    print("ACQUIRED", flush=True)
    time.sleep(hold_s)
    lock.release()
    print("RELEASED", flush=True)
""")


def spawn_holder(store_url: str, hold_s: float, wait: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLD_SCRIPT, store_url, str(hold_s)] + (["wait"] if wait else [])
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ})


def read_record(store) -> LockInfo:
    return LockInfo.parse(store.read(LOCK_KEY)[0])


def test_take_release_and_describe(tmp_path):
    store = open_store(str(tmp_path))
    lock = ReconcileLock(store, command="actfleet reconcile")
    with lock.hold():
        rec = read_record(store)
        assert rec.pid == os.getpid() and rec.command == "actfleet reconcile"
        assert "@" in rec.holder and rec.expires > rec.since
    assert store.generation(LOCK_KEY) is None


def test_second_process_is_told_who_holds_the_lock(tmp_path):
    holder = spawn_holder(str(tmp_path), hold_s=30)
    try:
        assert holder.stdout.readline().strip() == "ACQUIRED"
        with pytest.raises(LockHeld) as e:
            ReconcileLock(open_store(str(tmp_path))).acquire()
        assert e.value.info.pid == holder.pid
        assert f"pid {holder.pid}" in str(e.value) and "test holder" in str(e.value)
        assert e.value.exit_code == 0
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    store = open_store(str(tmp_path))
    holder = spawn_holder(str(tmp_path), hold_s=60)
    assert holder.stdout.readline().strip() == "ACQUIRED"
    holder.kill()  # SIGKILL: no release, the record stays behind
    holder.wait()
    assert read_record(store).pid == holder.pid
    lock = ReconcileLock(store)
    with lock.hold():
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
        assert read_record(store).pid == os.getpid()


def plant(store, **changes) -> None:
    now = time.time()
    rec = dict(
        holder="ops@elsewhere",
        host="elsewhere.example",
        pid=1,
        pid_start="",
        since=now - 10,
        expires=now + 300,
        command="actfleet reconcile",
        nonce="n",
    )
    rec.update(changes)
    store.create(LOCK_KEY, json.dumps(rec).encode())


def test_another_hosts_live_lock_is_respected_and_its_expired_lock_taken_over(tmp_path):
    store = open_store(str(tmp_path))
    plant(store)
    with pytest.raises(LockHeld, match="ops@elsewhere"):
        ReconcileLock(store).acquire()
    store.delete(LOCK_KEY)
    plant(store, expires=time.time() - 1)
    lock = ReconcileLock(store)
    lock.acquire()
    assert lock.took_over.host == "elsewhere.example"
    lock.release()


def test_unreadable_lock_is_treated_as_stale(tmp_path):
    store = open_store(str(tmp_path))
    store.create(LOCK_KEY, b"not json")
    with ReconcileLock(store).hold() as lock:
        assert read_record(store).pid == os.getpid()
        assert lock.took_over is None


def test_release_never_deletes_a_lock_taken_over_by_someone_else(tmp_path):
    store = open_store(str(tmp_path))
    lock = ReconcileLock(store)
    lock.acquire()
    _, gen = store.read(LOCK_KEY)
    store.replace(LOCK_KEY, b'{"someone": "else"}', gen)  # as a takeover would
    lock.release()
    assert lock.lost
    assert store.read(LOCK_KEY)[0] == b'{"someone": "else"}'


def test_holder_renews_its_expiry_while_it_works(tmp_path):
    store = open_store(str(tmp_path))
    lock = ReconcileLock(store, ttl_s=0.6)
    with lock.hold():
        first = read_record(store)
        for _ in range(200):  # renewal happens every ttl/3; poll until seen
            time.sleep(0.05)
            if read_record(store).expires > first.expires:
                break
        renewed = read_record(store)
        assert renewed.expires > first.expires and renewed.since == first.since
        lock.check()  # not lost


def test_wait_takes_the_lock_once_the_holder_releases_it(tmp_path):
    holder = spawn_holder(str(tmp_path), hold_s=1.5)
    assert holder.stdout.readline().strip() == "ACQUIRED"
    lock = ReconcileLock(open_store(str(tmp_path)))
    lock.acquire(wait=True, timeout_s=60)
    assert holder.wait(timeout=60) == 0
    assert read_record(lock.store).pid == os.getpid()
    lock.release()


def test_racing_processes_over_a_stale_lock_produce_exactly_one_holder(tmp_path):
    store = open_store(str(tmp_path))
    plant(store, expires=time.time() - 5)  # stale: every racer will try to take it over
    racers = [spawn_holder(str(tmp_path), hold_s=120) for _ in range(6)]
    try:
        outcomes = [p.stdout.readline().split(" ")[0].strip() for p in racers]
    finally:
        for p in racers:
            p.kill()
            p.wait()
    assert sorted(outcomes) == ["ACQUIRED"] + ["HELD"] * 5


def test_lock_on_gcs_with_generation_preconditions(fake_gcs):  # noqa: F811
    store = open_store("gs://acts-state/actfleet/acts")
    first = ReconcileLock(store)
    first.acquire()
    with pytest.raises(LockHeld):
        ReconcileLock(store).acquire()  # same host, our own live pid
    first.release()
    with ReconcileLock(store).hold():
        assert read_record(store).pid == os.getpid()


def test_lock_location_follows_the_state_backend(tmp_path):
    from actfleet.config import parse

    def cfg(**extra):
        raw = {
            "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
            "repo": {"url": "https://example.com/r.git", "commit": "0" * 40},
            "storage": {"bucket": "bkt-acts"},
            "job": {"model": "m", "input": "i", "layers": [1]},
        }
        raw.update(extra)
        return parse(raw)

    local = ReconcileLock.for_config(cfg(state={"path": str(tmp_path / "st")}))
    assert local.where == f"{tmp_path}/st/{LOCK_KEY}"
    explicit = ReconcileLock.for_config(cfg(reconcile={"lock": str(tmp_path / "locks" / "fleet.lock")}))
    assert explicit.where == f"{tmp_path}/locks/fleet.lock"


class _Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class _FailingRenewals:
    """A store whose replace() fails transiently (a GCS outage): renewals never land, nothing says lost."""

    def __init__(self, inner):
        self.inner, self.url = inner, inner.url

    def replace(self, key, data, generation):
        raise ConnectionError("503 backendError (injected)")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_check_fails_once_its_own_record_expired_while_renewals_failed(tmp_path):
    from actfleet.infra.lock import LockLost

    inner = open_store(str(tmp_path))
    clock = _Clock(1_000_000.0)
    lock = ReconcileLock(_FailingRenewals(inner), ttl_s=60, clock=clock)
    lock.try_acquire()  # held; the renewer is not started: renewals are what fails here
    lock.check()  # fresh: fine
    clock.t += 60 * 0.8  # inside the ttl, past the safety margin (the last quarter)
    with pytest.raises(LockLost, match="own record expires"):
        lock.check()
    # ... which is exactly when another pass, rightly, takes the stale lock over:
    clock.t += 60
    other = ReconcileLock(inner, clock=clock)
    assert other.try_acquire() and other.took_over is not None


def test_check_passes_while_renewals_keep_the_record_fresh(tmp_path):
    clock = _Clock(1_000_000.0)
    lock = ReconcileLock(open_store(str(tmp_path)), ttl_s=60, clock=clock)
    lock.try_acquire()
    for _ in range(5):
        clock.t += 30
        lock._gen, lock._info = (lambda d, i: (lock.store.replace(LOCK_KEY, d, lock._gen), i))(*lock._record())
        lock.check()


def test_release_whose_delete_landed_but_answered_503_is_not_lost(fake_gcs):  # noqa: F811
    store = open_store("gs://acts-state/actfleet/acts")
    lock = ReconcileLock(store)
    lock.acquire()
    fake_gcs.fail_after_next("DELETE", 1, 503)  # the delete is carried out; its reply is lost; the client retries
    lock.release()
    assert not lock.lost
    assert store.generation(LOCK_KEY) is None
    with ReconcileLock(store).hold():  # and the lock is free for the next pass
        pass
