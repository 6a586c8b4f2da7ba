"""The work loop keeps going, or stops for good with one line, as each trouble deserves (worker/work_loop.py):

- a worker waiting on others' leases wakes when one of them commits or releases, not a third of a lease later;
- an unavailable store (a local key lock held by a stalled writer, a GCS outage past the client's retry
  deadline) is waited out while claiming, and a unit whose commit meets it is abandoned, not a crash;
- a full disk (ENOSPC, EDQUOT, EFBIG) stops the worker at once with one line and exit 74, its unit released
  and nothing committed touched, instead of abandoning and re-claiming the unit forever. The real thing is
  tested on a small tmpfs mounted in a user namespace (`unshare -Urm`: real ENOSPC from the kernel; skipped
  where unprivileged user namespaces are off); the errno table through an injected OSError;
- SIGTERM's drain deadline holds even when an upload or an engine step blocks: the watchdog releases the
  leases and the process exits 0.

Waits here are safety nets of a minute against behaviour that would take twenty (a third of an hour-long lease)
or forever; nothing asserts a duration.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actfleet import work_queue as q
from actfleet.errors import DiskFull
from actfleet.store import StoreBusy, open_store
from actfleet.worker.background import in_thread
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_chaos import REPO, actfleet_argv, standin_worker
from tests.test_chaos_stalls import _no_process_left_behind, events, started, tail  # noqa: F401  (autouse fixture)

SAFETY_S = 60  # a hung test's limit, not a measurement


def make_job(tmp_path, rows: int, unit_rows: int):
    data = sx.write_dataset(tmp_path / "data.jsonl", rows)
    store = open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows, options={}
    )
    return store, spec, data


def wait_for_state(store, worker: str, state: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        rec = q.read_worker_records(store, "job").get(worker)
        if rec is not None and rec.state == state:
            return
        time.sleep(0.02)
    raise AssertionError(f"{worker} never reached state {state!r}")


def run_in_thread(w: Worker):
    fut = in_thread(w.run)
    return fut


def finish(fut, w: Worker):
    try:
        return fut.result(timeout=SAFETY_S)
    finally:
        w.request_stop()  # a worker still waiting (the old loop: a third of the lease) stops at once


# ----------------------------------------------------------------------------------------------------
# Waiting on others' leases (issue 23 item 4)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other_ends_by", ["committing", "releasing"])
def test_a_worker_waiting_on_another_workers_lease_wakes_when_it_ends(tmp_path, other_ends_by):
    """Leases of an hour: the old loop slept a third of one (20 minutes) before looking again."""
    store, spec, data = make_job(tmp_path, rows=8, unit_rows=4)
    other = q.claim(store, "job", 1, "other", 3600.0)
    w = Worker(store, spec, sx.StandinExtractor(data), "w1", lease_seconds=3600.0)
    fut = run_in_thread(w)
    wait_for_state(store, "w1", "waiting")  # unit 0 done, unit 1 leased by `other`
    if other_ends_by == "committing":
        start, stop = spec.unit_range(1)
        rec = q.DoneRecord(1, start, stop, "other", 1, 0, 0, {"no tokens stored": list(range(start, stop))}, [], 0, 0)
        assert q.commit(store, other, rec, 3600.0)
    else:
        q.release(store, other)  # abandoned: w1 claims it
    result = finish(fut, w)
    assert result.job_complete and not result.stopped_by_signal
    assert result.units_committed == (1 if other_ends_by == "committing" else 2)


# ----------------------------------------------------------------------------------------------------
# An unavailable store (issue 27 item 11)
# ----------------------------------------------------------------------------------------------------


class Failing:
    """Wraps a store: calls to `methods` on keys containing `where` raise `make()` while `left` > 0."""

    def __init__(self, inner, methods: set[str], where: str, make, times: int):
        self.inner, self.methods, self.where, self.make, self.left, self.raised = inner, methods, where, make, times, 0
        self.keys: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in self.methods:
            return attr

        def call(key, *args, **kw):
            if self.where in key and self.left > 0:
                self.left -= 1
                self.raised += 1
                self.keys.append(key)
                raise self.make(key)
            return attr(key, *args, **kw)

        return call


def test_store_busy_during_a_take_over_is_waited_out(tmp_path):
    """A local key lock held by a stalled writer (StoreBusy) when the worker takes an expired lease over."""
    store, spec, data = make_job(tmp_path, rows=4, unit_rows=4)
    q.claim(store, "job", 0, "dead", 1.0, now=time.time() - 60)  # expired a minute ago
    busy = Failing(store, {"replace"}, "/leases/", lambda key: StoreBusy(f"{key}: its lock has been held"), 2)
    w = Worker(busy, spec, sx.StandinExtractor(data), "w1", lease_seconds=30)
    result = finish(run_in_thread(w), w)
    assert busy.raised == 2 and result.job_complete and result.units_committed == 1
    assert verify(store, "job").ok


def retry_error(key: str):
    from google.api_core import exceptions as gexc

    return gexc.RetryError(f"Timeout of 120.0s exceeded ({key})", gexc.ServiceUnavailable("503 backend error"))


def test_a_gcs_outage_past_the_retry_deadline_while_claiming_is_waited_out(tmp_path):
    store, spec, data = make_job(tmp_path, rows=8, unit_rows=4)
    down = Failing(store, {"list"}, "job/", retry_error, 3)  # every listing fails three times in a row
    w = Worker(down, spec, sx.StandinExtractor(data), "w1", lease_seconds=30)
    result = finish(run_in_thread(w), w)
    assert down.raised == 3 and result.job_complete and result.units_committed == 2
    assert verify(store, "job").ok


def test_a_gcs_outage_at_commit_abandons_the_unit_and_the_loop_goes_on(tmp_path):
    store, spec, data = make_job(tmp_path, rows=8, unit_rows=4)
    down = Failing(store, {"create"}, "/done/", retry_error, 1)  # the first done record's create
    seen = []
    w = Worker(down, spec, sx.StandinExtractor(data), "w1", lease_seconds=30, on_event=lambda k, i: seen.append(k))
    result = finish(run_in_thread(w), w)
    assert down.raised == 1 and "abandoned" in seen
    assert result.job_complete and result.units_committed == 2 and result.units_abandoned == 1
    assert verify(store, "job", clean=True).ok


def test_work_exits_75_with_one_line_when_the_store_is_down_at_start(tmp_path, monkeypatch, capsys):
    from actfleet.cli import main

    monkeypatch.setattr(q, "read_job", lambda store, job: (_ for _ in ()).throw(retry_error("job/job.json")))
    with pytest.raises(SystemExit) as e:
        main(["work", "--store", str(tmp_path / "bucket"), "--job", "job", "--worker-id", "w1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 75
    assert len(err) == 1 and err[0].startswith("actfleet: store unavailable: RetryError: Timeout of 120.0s"), err


# ----------------------------------------------------------------------------------------------------
# A full disk (issue 27 item 9)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_stops_the_worker_releasing_its_unit_and_keeping_what_was_committed(tmp_path, code):
    store, spec, data = make_job(tmp_path, rows=12, unit_rows=4)
    first = Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30, max_units=1).run()
    assert first.units_committed == 1
    done_before = {u: q.read_done(store, "job", u) for u in q.done_units(store, "job")}
    full = Failing(
        store, {"put"}, "/shards/", lambda key: OSError(code, os.strerror(code), str(tmp_path / "bucket" / key)), 99
    )
    w = Worker(full, spec, sx.StandinExtractor(data), "w1", lease_seconds=30)
    fut = run_in_thread(w)
    with pytest.raises(DiskFull) as e:
        finish(fut, w)
    # Not retried (retrying cannot make space): each shard tried once (with the next unit prefetched, the
    # units in flight may each have tried one).
    assert e.value.exit_code == 74 and full.raised >= 1 and len(set(full.keys)) == full.raised  # no key twice
    assert str(e.value).startswith("disk full: storing job/shards/") and errno.errorcode[code] in str(e.value)
    assert "\n" not in str(e.value)
    assert list(store.list("job/leases/")) == []  # the unit in flight is free for a worker with space
    assert q.read_worker_records(store, "job")["w1"].state == "failed"
    assert {u: q.read_done(store, "job", u) for u in q.done_units(store, "job")} == done_before
    result = Worker(store, spec, sx.StandinExtractor(data), "w2", lease_seconds=30).run()
    assert result.job_complete and verify(store, "job", clean=True).ok


def test_a_full_data_cache_is_disk_full_not_bad_input(tmp_path, monkeypatch):
    """A worker copying its pinned dataset into a full cache: exit 74 (this machine), not 2 (the dataset)."""
    from actfleet.worker import pinning

    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "cache"))

    def write(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "x"))

    with pytest.raises(DiskFull, match=r"^disk full: caching dataset data.jsonl in .*ENOSPC"):
        pinning._fetch_to_cache("data.jsonl", write, ".jsonl", expect=None)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # the partial copy is gone


def _userns_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || exit 1"],
        capture_output=True,
    )
    return probe.returncode == 0


small_disk = pytest.mark.skipif(not _userns_tmpfs(), reason="needs unprivileged user namespaces (unshare -Urm)")

# Runs "$@" with $DISK a tmpfs of $SIZE KiB holding a copy of $SRC at $DISK/store and a filler leaving $FREE KiB,
# then copies $DISK/store back out to $OUT (the namespace, and the tmpfs, end with the process).
SMALL_DISK_SH = r"""
set -e
mount -t tmpfs -o size=${SIZE}k tmpfs "$DISK"
if [ -n "$SRC" ]; then cp -a "$SRC" "$DISK/store"; fi
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null || true
truncate -s -${FREE}k "$DISK/filler"
set +e
"$@"
rc=$?
if [ -n "$SRC" ]; then cp -a "$DISK/store/." "$OUT"; fi
if [ -n "$CHECK" ]; then if [ -e "$CHECK" ]; then echo "left: $(ls -A "$CHECK")"; else echo "gone"; fi; fi
exit $rc
"""


def on_small_disk(
    tmp_path: Path, argv: list[str], *, src: Path | None, out: Path | None, free_kib: int, check: Path | None = None
):
    disk = tmp_path / "disk"
    disk.mkdir()
    if out is not None:
        out.mkdir()
    env = {
        **os.environ,
        "DISK": str(disk),
        "SIZE": "2048",
        "FREE": str(free_kib),
        "SRC": str(src or ""),
        "OUT": str(out or ""),
        "CHECK": str(check or ""),
    }
    p = subprocess.Popen(
        ["unshare", "-Urm", "sh", "-c", SMALL_DISK_SH, "sh", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = p.communicate(timeout=SAFETY_S * 2)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError(
            f"still running after {SAFETY_S * 2} s on a full disk:\n{stdout[-2000:]}\n{stderr[-2000:]}"
        )
    return p.returncode, stdout, stderr, disk


@small_disk
@pytest.mark.slow
def test_a_worker_whose_store_disk_fills_up_exits_74_with_one_line(tmp_path):
    """The store on a real, nearly full tmpfs (ENOSPC from the kernel): the worker's first shard does not fit."""
    store, spec, data = make_job(tmp_path, rows=24, unit_rows=8)
    assert Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30, max_units=1).run().units_committed
    done_before = {u: q.read_done(store, "job", u) for u in q.done_units(store, "job")}
    out = tmp_path / "after"
    rc, stdout, stderr, disk = on_small_disk(
        tmp_path,
        [
            sys.executable,
            "-m",
            "tests.fakes.standin_extractor",
            f"{disk_store(tmp_path)}",
            "job",
            "w1",
            str(data),
            "0",
            "30",
            "5",
        ],
        src=tmp_path / "bucket",
        out=out,
        free_kib=12,
    )
    lines = [s for s in stderr.splitlines() if s.startswith("actfleet:")]
    assert rc == 74, (rc, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("actfleet: disk full: storing job/shards/") and "(ENOSPC)" in lines[0], lines
    after = open_store(str(out))
    assert list(after.list("job/leases/")) == []  # released: the unit is free for a worker with space
    assert {u: q.read_done(after, "job", u) for u in q.done_units(after, "job")} == done_before
    assert not [p for p in out.rglob(".*.tmp-*")], "a partial upload was left behind"
    result = Worker(after, spec, sx.StandinExtractor(data), "w2", lease_seconds=30).run()
    assert result.job_complete and verify(after, "job", clean=True).ok


def disk_store(tmp_path: Path) -> Path:
    return tmp_path / "disk" / "store"


@small_disk
@pytest.mark.slow
def test_an_export_onto_a_full_disk_is_one_line_exit_74_and_leaves_nothing(tmp_path):
    pytest.importorskip("datasets")
    store, spec, data = make_job(tmp_path, rows=24, unit_rows=8)
    assert Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30).run().job_complete
    target = tmp_path / "disk" / "export"
    rc, stdout, stderr, _ = on_small_disk(
        tmp_path,
        [
            *actfleet_argv("export", "saelens", str(tmp_path / "bucket" / "job"), str(target)),
            "--site",
            sx.SITES[0],
            "--context-size",
            "2",
            "--chunk-mb",
            "1",
        ],
        src=None,
        out=None,
        free_kib=4,
        check=target,  # does the partial export survive the failure? (printed last, inside the namespace)
    )
    lines = [s for s in stderr.splitlines() if s.startswith("actfleet:")]
    assert rc == 74, (rc, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("actfleet: disk full:"), stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == "gone", stdout[-2000:]  # no partial dataset left holding the space


# ----------------------------------------------------------------------------------------------------
# SIGTERM's drain deadline is hard (issue 27 item 10)
# ----------------------------------------------------------------------------------------------------


def test_sigterm_ends_a_worker_blocked_in_an_engine_step(tmp_path):
    """A batch that takes an hour (an engine step that never returns, as far as the drain is concerned)."""
    store, spec, data = make_job(tmp_path, rows=8, unit_rows=8)
    w = started(standin_worker(store.url, "job", "w1", data, 3600.0, 30, 1.0))
    assert w.wait_for(lambda s: s.startswith("computing")), tail(w)
    w.p.send_signal(signal.SIGTERM)
    assert w.p.wait(timeout=SAFETY_S) == 0, tail(w)
    assert events(w, "drain-timeout") == [{"job": "job", "released": [0]}], tail(w)
    assert list(store.list("job/leases/")) == [] and q.done_units(store, "job") == set()
    assert q.read_worker_records(store, "job")["w1"].state == "stopped"


@pytest.mark.slow
def test_sigterm_ends_a_worker_blocked_in_an_upload(tmp_path, fake_gcs, monkeypatch):  # noqa: F811
    """The first shard upload is held at the (fake) GCS server until the worker has exited."""
    data = sx.write_dataset(tmp_path / "data.jsonl", 8)
    store = open_store("gs://drain-bucket/held")
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=8, unit_rows=8, options={})
    arrived, release = threading.Event(), threading.Event()
    real_write = fake_gcs.write

    def write(bucket, name, body, content_type, query):
        if "/shards/" in name:
            arrived.set()
            release.wait(SAFETY_S * 2)
        return real_write(bucket, name, body, content_type, query)

    monkeypatch.setattr(fake_gcs, "write", write)
    w = started(standin_worker(store.url, "job", "w1", data, 0.0, 30, 1.0))
    try:
        assert arrived.wait(SAFETY_S), tail(w)
        w.p.send_signal(signal.SIGTERM)
        assert w.p.wait(timeout=SAFETY_S) == 0, tail(w)  # while its upload is still held
        assert not release.is_set()
    finally:
        release.set()
    assert events(w, "drain-timeout") == [{"job": "job", "released": [0]}], tail(w)
    assert list(store.list("job/leases/")) == [] and q.done_units(store, "job") == set()
