"""The Store contract, run identically against LocalStore (a temp dir) and GcsStore (the enforcing fake GCS
server in tests/fakes/gcs_server.py, through the real google-cloud-storage client)."""

from __future__ import annotations

import os

import pytest

from actfleet.errors import InputError
from actfleet.store import LocalStore, NotFound, PreconditionFailed, open_store, parse_gs
from tests.fakes.gcs_server import FakeGcs, fake_gcs  # noqa: F401  (fixture)


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "bucket"))
    request.getfixturevalue("fake_gcs")  # the fake GCS server the gs:// store talks to
    return open_store("gs://test-bucket/some/prefix")


def test_create_is_create_if_absent(store):
    gen = store.create("job/leases/000001", b"first")
    assert gen > 0
    with pytest.raises(PreconditionFailed):
        store.create("job/leases/000001", b"second")
    assert store.read("job/leases/000001") == (b"first", gen)


def test_replace_needs_the_current_generation(store):
    gen = store.create("k", b"v1")
    gen2 = store.replace("k", b"v2", gen)
    assert gen2 != gen
    with pytest.raises(PreconditionFailed):
        store.replace("k", b"v3", gen)  # stale generation
    assert store.read("k") == (b"v2", gen2)
    with pytest.raises(PreconditionFailed):
        store.replace("absent", b"x", gen2)


def test_delete_with_and_without_generation(store):
    gen = store.create("a", b"1")
    with pytest.raises(PreconditionFailed):
        store.delete("a", gen + 1)
    store.delete("a", gen)
    assert store.generation("a") is None
    with pytest.raises(NotFound):
        store.delete("a")
    with pytest.raises(NotFound):
        store.read("a")
    store.put("b", b"2")
    store.delete("b")
    assert store.generation("b") is None


def test_generation_changes_on_every_write(store):
    gens = [store.put("s", b"x") for _ in range(5)]
    assert len(set(gens)) == 5
    assert store.generation("s") == gens[-1]
    # a deleted and re-created key never gets an old generation back
    store.delete("s")
    assert store.create("s", b"x") not in gens


def test_put_from_bytes_and_file_and_list(store, tmp_path):
    src = tmp_path / "shard.bin"
    payload = os.urandom(9 * 1024 * 1024 + 7)  # above the client's multipart limit: resumable upload on GCS
    src.write_bytes(payload)
    store.put("job/shards/000000-0000.safetensors", src)
    store.put("job/shards/000001-0000.safetensors", b"small")
    store.put("job/done/000000", b"{}")
    store.put("jobb/x", b"other job")
    assert store.read("job/shards/000000-0000.safetensors")[0] == payload
    assert store.size("job/shards/000000-0000.safetensors") == len(payload)
    assert list(store.list("job/shards/")) == [
        "job/shards/000000-0000.safetensors",
        "job/shards/000001-0000.safetensors",
    ]
    assert list(store.list("job/")) == [
        "job/done/000000",
        "job/shards/000000-0000.safetensors",
        "job/shards/000001-0000.safetensors",
    ]
    assert list(store.list("nothing/")) == []


def test_local_path_only_on_the_filesystem(store):
    store.put("x/y", b"abc")
    p = store.local_path("x/y")
    if isinstance(store, LocalStore):
        assert p.read_bytes() == b"abc"
        assert store.local_path("x/absent") is None
    else:
        assert p is None


def test_local_store_leaves_no_temporary_files_in_listings(tmp_path):
    store = LocalStore(tmp_path)
    store.create("j/leases/1", b"a")
    gen = store.generation("j/leases/1")
    store.replace("j/leases/1", b"b", gen)
    assert list(store.list("")) == ["j/leases/1"]
    assert sorted(p.name for p in (tmp_path / "j" / "leases").iterdir()) == ["1"]


def test_gcs_transient_errors_are_retried(fake_gcs):
    store = open_store("gs://b/p")
    fake_gcs.fail_next(3, 503)
    gen = store.create("k", b"v")  # three 503s, then success
    fake_gcs.fail_next(2, 429)
    assert store.read("k") == (b"v", gen)


def test_open_store_urls(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}").url == str(tmp_path)
    for bad in ("s3://bucket/x", "gs://", "file://host/x", ""):
        with pytest.raises(InputError):
            open_store(bad)
    with pytest.raises(InputError):
        LocalStore(tmp_path).read("../escape")


@pytest.mark.parametrize(
    "url, want",
    [
        ("gs://b", ("b", "")),
        ("gs://b/", ("b", "")),
        ("gs://b/p/q/", ("b", "p/q")),
        ("gs://b//x.jsonl", ("b", "x.jsonl")),
        ("gs://my-acts/runs/job/job.json", ("my-acts", "runs/job/job.json")),
        ("gs://b/a..b/c", ("b", "a..b/c")),
    ],
)
def test_parse_gs(url, want):
    assert parse_gs(url) == want


@pytest.mark.parametrize(
    "url, message",
    [
        ("gs://", "no bucket"),
        ("gs:///x", "no bucket"),
        ("gs://b/../x", '".."'),
        ("gs://b/p/..", '".."'),
        ("s3://b/x", "not a gs:// URL"),
        ("/local/path", "not a gs:// URL"),
    ],
)
def test_parse_gs_refuses_with_one_line_naming_the_url(url, message):
    with pytest.raises(InputError, match=message) as e:
        parse_gs(url, "store")
    assert str(e.value).startswith(f'store "{url}"') and "\n" not in str(e.value)
    if url.startswith("gs://"):
        with pytest.raises(InputError, match=message):
            open_store(url)


# ---------------------------------------------------------------------------------------------------
# A stalled writer (SIGSTOP in the middle of its payload) must not block anyone else on the local store
# ---------------------------------------------------------------------------------------------------

STALLED_PUT = r"""
import os, signal, sys
from actfleet.store import open_store
real_fsync = os.fsync
def stalled_fsync(fd):  # the payload is written; stop here, as a SIGSTOP or a stalled disk would
    os.kill(os.getpid(), signal.SIGSTOP)
    real_fsync(fd)
os.fsync = stalled_fsync
open_store(sys.argv[1]).put("job/shards/000001-0000.safetensors", b"x" * (1 << 20))
print("put done", flush=True)
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_writer_stopped_inside_put_blocks_no_other_writer(tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    root = tmp_path / "bucket"
    store = open_store(str(root))
    key = "job/shards/000001-0000.safetensors"
    gen = store.put(key, b"first attempt")
    child = subprocess.Popen([sys.executable, "-c", STALLED_PUT, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):  # hang guard, not a timing: until the child has stopped itself
            if child.poll() is not None or _stopped(child.pid):
                break
            time.sleep(0.01)
        assert _stopped(child.pid), "the child never reached its stall"
        results = []
        t = threading.Thread(target=lambda: results.append(store.replace(key, b"takeover", gen)), daemon=True)
        t.start()
        t.join(120)  # with the payload written under the key's lock this waited until SIGCONT
        assert not t.is_alive(), "a writer stopped inside put() blocked another writer of the same key"
        assert store.read(key) == (b"takeover", results[0])
    finally:
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and "put done" in out
    data, later = store.read(key)  # the resumed put landed after (and above) the takeover
    assert data == b"x" * (1 << 20) and later > results[0]
    assert [k for k in os.listdir(root / "job" / "shards")] == ["000001-0000.safetensors"]


def test_a_held_key_lock_ends_in_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    import fcntl
    import hashlib

    from actfleet import store as store_mod

    store = open_store(str(tmp_path / "bucket"))
    gen = store.create("job/leases/000002", b"mine")
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 0.3)
    lock_file = tmp_path / "bucket" / store_mod.LOCK_DIR / hashlib.sha256(b"job/leases/000002").hexdigest()[:32]
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a holder stalled inside its compare-and-rename
        with pytest.raises(store_mod.StoreBusy, match="000002.*held for over"):
            store.replace("job/leases/000002", b"theirs", gen)
    finally:
        os.close(fd)
    assert store.read("job/leases/000002") == (b"mine", gen)
    assert sorted(os.listdir(tmp_path / "bucket" / "job" / "leases")) == ["000002"]  # no temporary left behind
