"""Multi-host slices (actfleet.worker.multihost): one worker over several processes through jax.distributed.

The slow tests run real `actfleet work` processes on the CPU backend, 2 processes x 2 devices joined by
jax.distributed with gloo collectives, on a tiny random Qwen2: the slice stores what one process stores, and a
SIGKILLed follower makes the slice's unit expire and be taken over by another worker, nothing mixed. The fast
ones check the role detection against a metadata server stand-in that insists on its header (as
tests/test_bootstrap.py), and the leader/follower protocol and lease keeping in-process.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.store import open_store
from actfleet.worker import multihost
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import PreparedUnit, Worker
from tests.fakes import standin_extractor as sx
from tests.fakes.metadata_server import serve_attributes
from tests.test_chaos import Proc, actfleet_argv, unit_tensors

# ----------------------------------------------------------------------------------------------------
# Role detection
# ----------------------------------------------------------------------------------------------------


def test_role_from_flags():
    assert multihost.detect(metadata=lambda key: None) is None  # no flags, not a TPU slice: one host
    assert multihost.detect(num_processes=1) is None  # explicitly one host: no metadata lookup
    role = multihost.detect("127.0.0.1:4567", 2, 1)
    assert (role.coordinator, role.num_processes, role.process_id, role.leader) == ("127.0.0.1:4567", 2, 1, False)
    assert multihost.detect("[::1]:4567", 2, 0).leader
    with pytest.raises(InputError, match="--process-id missing"):
        multihost.detect("127.0.0.1:4567", 2, None)
    with pytest.raises(InputError, match="expected HOST:PORT"):
        multihost.detect("127.0.0.1", 2, 0)
    with pytest.raises(InputError, match="process id 2 of 2"):
        multihost.detect("h:1", 2, 2)


@pytest.fixture
def metadata_server(monkeypatch):
    """A metadata server stand-in serving `attrs` (a dict the test fills) only with Metadata-Flavor: Google."""
    attrs: dict[str, str] = {}
    with serve_attributes(lambda key: attrs[key].encode() if key in attrs else None) as (url, served):
        monkeypatch.setenv("ACTFLEET_METADATA_URL", url)
        yield attrs, served


def test_role_from_the_tpu_vm_metadata(metadata_server):
    attrs, served = metadata_server
    assert multihost.detect() is None  # a GCE VM that is not a TPU: no agent-worker-number (404)
    attrs.update({"agent-worker-number": "0", "worker-network-endpoints": "10.0.0.5"})
    assert multihost.detect() is None  # a single-host TPU VM
    attrs.update(
        {
            "agent-worker-number": "2",
            "worker-network-endpoints": "t-w-0.internal,t-w-1.internal,t-w-2.internal,t-w-3.internal",
        }
    )
    role = multihost.detect()
    assert (role.coordinator, role.num_processes, role.process_id, role.source) == (
        "t-w-0.internal:8482",
        4,
        2,
        "tpu-metadata",
    )
    # the older name:id:ip format, as jax's own TPU detection reads it
    attrs.update({"agent-worker-number": "0", "worker-network-endpoints": "a:0:10.1.0.2,a:1:10.1.0.3"})
    role = multihost.detect()
    assert (role.coordinator, role.num_processes, role.leader) == ("10.1.0.2:8482", 2, True)
    assert all(status in (200, 404) for _, status in served)  # every request carried the header
    attrs["worker-network-endpoints"] = "a:b"
    with pytest.raises(InputError, match="worker-network-endpoints"):
        multihost.detect()
    # flags win over the metadata
    assert multihost.detect("127.0.0.1:9", 2, 1).coordinator == "127.0.0.1:9"


# ----------------------------------------------------------------------------------------------------
# The protocol, in-process: a key-value store stand-in and counting extractors
# ----------------------------------------------------------------------------------------------------


class FakeKV:
    """The distributed runtime client's key-value calls (blocking get times out like the real one)."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.cond = threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cond:
            assert allow_overwrite or key not in self.data, key
            self.data[key] = value
            self.cond.notify_all()

    def key_value_delete(self, key):
        with self.cond:
            self.data.pop(key, None)

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError("DEADLINE_EXCEEDED: key not found")
            return self.data[key]


class Counting:
    """An extractor whose run() counts the steps taken per unit; it fails at `fail_at` = (unit, step)."""

    def __init__(self, fail_at=None):
        self.steps: dict[int, int] = {}
        self.fail_at = fail_at

    def rows(self, start, stop):
        return [(i, "x", None) for i in range(start, stop)]

    def prepare(self, start, stop):
        rows = self.rows(start, stop)
        return PreparedUnit(start, stop, rows, rows, len(rows))

    def run_stream(self, units):
        for k, unit in enumerate(units):  # unit after unit: each step is one row
            for row in self.run(unit.work):
                yield k, row

    def run(self, rows):
        unit = rows[0][0] // 10
        self.steps[unit] = 0
        for k, row in enumerate(rows):
            self.steps[unit] += 1
            if (unit, k) == self.fail_at:
                raise ValueError("engine error")
            yield row


class Broken(Exception):
    pass


def test_followers_take_exactly_the_leaders_engine_steps():
    kv = FakeKV()
    leader_inner, follower_inner = Counting(fail_at=(2, 3)), Counting(fail_at=(2, 3))
    broken: list = []

    def on_broken(who):
        def record(unit, step, error):
            broken.append((who, unit, step, str(error)))
            raise Broken()  # stands in for the process exit

        return record

    leader = multihost.LeaderExtractor(
        leader_inner, multihost.Channel(kv), multihost.Progress(60), unit_rows=10, on_broken=on_broken("leader")
    )
    got: dict = {}

    def follower():
        try:
            multihost.follow(multihost.Channel(kv), follower_inner, on_broken=on_broken("follower"))
        except Broken:
            got["broken"] = True

    t = threading.Thread(target=follower)
    t.start()
    assert len(list(leader.run_stream([leader.prepare(0, 10)]))) == 10  # a whole unit
    stream = leader.run_stream([leader.prepare(10, 20)])
    for i, _ in enumerate(stream):  # the work loop stops early (lease lost)
        if i == 1:
            break
    stream.close()
    with pytest.raises(Broken):  # an engine step fails on both hosts (a collective's peer is gone): both end
        list(leader.run_stream([leader.prepare(20, 30)]))
    t.join(timeout=30)
    assert got == {"broken": True}
    assert sorted(broken) == [("follower", 2, 3, "engine error"), ("leader", 2, 3, "engine error")]
    assert follower_inner.steps == leader_inner.steps == {0: 10, 1: 2, 2: 4}


def test_a_follower_stops_with_the_leader():
    kv = FakeKV()
    leader_inner, follower_inner = Counting(), Counting()
    leader = multihost.LeaderExtractor(leader_inner, multihost.Channel(kv), multihost.Progress(60), unit_rows=10)
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(r=multihost.follow(multihost.Channel(kv), follower_inner)))
    t.start()
    assert len(list(leader.run_stream([leader.prepare(30, 34)]))) == 4
    leader.channel.send("stop", job_complete=True)
    t.join(timeout=30)
    assert (got["r"].units, got["r"].steps, got["r"].aborted, got["r"].job_complete) == (1, 4, 0, True)
    assert follower_inner.steps == leader_inner.steps == {3: 4}


def test_the_lease_lapses_while_the_slice_makes_no_progress(tmp_path):
    """healthy() False (an engine step stalled): no renewal, so the lease expires and the unit is abandoned
    uncommitted; while healthy the same unit commits."""
    data = sx.write_dataset(tmp_path / "d.jsonl", 8)
    store = open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=8, unit_rows=8, options={}
    )
    events = []
    stalled = Worker(
        store,
        spec,
        sx.StandinExtractor(data, batch_rows=1, delay=0.2),
        "slice",
        lease_seconds=0.6,
        healthy=lambda: False,
        on_event=lambda kind, info: events.append(kind),
    )
    lease = q.next_unit(store, spec, "slice", 0.6).lease
    assert stalled._process(lease) == (False, 0)  # 8 batches x 0.2 s outlive the unrenewed 0.6 s lease
    assert "abandoned" in events and q.read_done(store, "job", 0) is None
    ok = Worker(store, spec, sx.StandinExtractor(data, batch_rows=1, delay=0.2), "slice", lease_seconds=0.6)
    assert ok.run().units_committed == 1


def test_the_watchdog_acts_on_a_stalled_step_only():
    now = [0.0]
    progress = multihost.Progress(5.0, clock=lambda: now[0])
    now[0] = 100.0  # time outside a step (uploading, waiting for a lease) never counts
    assert progress.healthy()
    fired = threading.Event()
    with progress.step():
        now[0] = 104.0
        assert progress.healthy()
        multihost.start_watchdog(progress, interval=0.01, on_stall=lambda secs: fired.set())
        assert not fired.wait(0.2)
        now[0] = 105.5
        assert not progress.healthy() and fired.wait(10)
    assert progress.healthy()


# ----------------------------------------------------------------------------------------------------
# Real processes: 2 x 2 CPU devices through jax.distributed
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from actfleet.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("multihost")
    model = make_tiny_model(root / "model", seed=4)
    rng = random.Random(5)
    words = "the fox grid answer shard token lease unit worker bucket".split()
    data = root / "data.jsonl"
    # 64-125 tokens a row, 4 rows of 128 a batch: two engine steps per unit of 8 rows.
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 35)))}) + "\n"
            for _ in range(24)
        )
    )
    return root, model, data


OPTIONS = (
    "--layers",
    "0,1",
    "--sites",
    "resid_post",
    "--positions",
    "all",
    "--store-dtype",
    "float32",
    "--compute-dtype",
    "float32",
    "--batch-tokens",
    "512",
    "--unit-rows",
    "8",
)


def env(devices: int, root: Path) -> dict:
    return {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "ACTFLEET_JAX_CACHE": str(root / "jax-cache"),
    }


def prepare(store: Path, model: Path, data: Path) -> None:
    p = Proc(
        actfleet_argv(
            "prepare",
            "--store",
            str(store),
            "--job",
            "j",
            "--model",
            str(model),
            "--input",
            str(data),
            *OPTIONS,
            "--shard-mb",
            "0.01",
        )
    )
    assert p.p.wait(timeout=300) == 0, "\n".join(p.lines)


def slice_processes(store: Path, root: Path, *extra: str) -> list[Proc]:
    port = free_port()
    return [
        Proc(
            actfleet_argv(
                "work",
                "--store",
                str(store),
                "--job",
                "j",
                "--worker-id",
                "slice-a",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--json",
                *extra,
            ),
            env=env(2, root),
        )
        for i in (0, 1)
    ]


def result(proc: Proc) -> dict:
    return json.loads(proc.wait_for(lambda s: s.startswith('{"worker"')))


@pytest.mark.slow
def test_a_two_host_slice_stores_the_rows_of_one_process(tiny, tmp_path):
    root, model, data = tiny
    store_dir = tmp_path / "bucket"
    prepare(store_dir, model, data)
    procs = slice_processes(store_dir, root)
    for p in procs:
        assert p.p.wait(timeout=600) == 0, "\n".join(p.lines[-30:])
    leader, follower = (result(p) for p in procs)
    assert leader["units_committed"] == 3 and leader["job_complete"] and leader["processes"] == 2
    assert follower["units_followed"] == 3 and follower["job_complete"] and follower["steps"] > 3
    store = open_store(str(store_dir))
    assert verify(store, "j").ok  # no garbage either: nobody but the leader wrote a shard
    listed = {s.name for u in range(3) for s in q.read_done(store, "j", u).shards}
    assert {k.split("/", 1)[1] for k in store.list("j/shards/")} == listed
    assert {q.read_done(store, "j", u).worker for u in range(3)} == {"slice-a"}
    assert list(q.read_worker_records(store, "j")) == ["slice-a"]

    out = tmp_path / "extract"  # one process, two devices, the same unit boundaries
    e = Proc(
        actfleet_argv("extract", "--model", str(model), "--input", str(data), "--out", str(out), *OPTIONS),
        env=env(2, root),
    )
    assert e.p.wait(timeout=600) == 0, "\n".join(e.lines[-20:])
    from actfleet.worker.reader import load

    ref = load(str(out))
    got = {k: np.concatenate([unit_tensors(store, "j", u)[k] for u in range(3)]) for k in ref}
    order = np.lexsort((got["positions"], got["sample_ids"]))
    d_model = json.loads((model / "config.json").read_text())["hidden_size"]
    for name in ref:
        a, b = got[name][order], ref[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name.startswith("blocks."):
            assert a.shape[1] == d_model  # whole vectors, never one host's half
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["killed", "hung"])
def test_a_lost_host_lets_the_slices_unit_expire_and_be_taken_over(tiny, tmp_path, mode):
    """The follower is SIGKILLed (killed) or SIGSTOPped (hung: it still holds its connections, nothing errors,
    and jax.distributed's heartbeat is set too long to act) inside a unit. The leader ends non-zero without
    releasing or renewing its lease -- killed: on the collective's error or jax.distributed's heartbeat;
    hung: by its stall watchdog -- and a single-process worker takes the unit over, nothing mixed."""
    root, model, data = tiny
    store_dir = tmp_path / "bucket"
    prepare(store_dir, model, data)
    timing = {
        "killed": ("--heartbeat-seconds", "4", "--stall-seconds", "600"),
        "hung": ("--heartbeat-seconds", "600", "--stall-seconds", "8"),
    }[mode]
    leader, follower = slice_processes(store_dir, root, "--lease-seconds", "2", *timing)
    try:
        line = follower.wait_for(lambda s: s.startswith("computed "), timeout=600)
        assert line is not None, "\n".join(follower.lines[-30:])
        follower.p.send_signal(signal.SIGKILL if mode == "killed" else signal.SIGSTOP)
        rc = leader.p.wait(timeout=300)  # a safety net: the leader would renew and wait forever
        lines = "\n".join(leader.lines[-30:])
        # Never abandoned (that releases the lease, and the next unit's collective fails the same way)
        assert not any(s.startswith("abandoned ") for s in leader.lines), lines
        if mode == "killed":
            assert rc in (-signal.SIGABRT, multihost.EXIT_STALLED), lines
            assert rc == -signal.SIGABRT or leader.wait_for(lambda s: s.startswith("slice-broken ")), lines
        else:
            assert rc == multihost.EXIT_STALLED and leader.wait_for(lambda s: s.startswith("stalled ")), lines
    finally:
        for p in (leader, follower):
            if p.p.poll() is None:
                p.p.send_signal(signal.SIGCONT)
                p.p.kill()
                p.p.wait()
    store = open_store(str(store_dir))
    # The units the slice held when it died (the one of the kill, or the next if the slice finished that one
    # first, and the one it had already claimed and prepared to stream next): their leases are left to
    # expire, never released, and none of them is done.
    left = [lease for u in range(3) if (lease := q.read_lease(store, "j", u)) is not None]
    assert left and all((x.worker, x.attempt) == ("slice-a", 1) for x in left), left
    assert all(q.read_done(store, "j", x.unit) is None for x in left)

    rescue = Proc(
        actfleet_argv(
            "work", "--store", str(store_dir), "--job", "j", "--worker-id", "rescue", "--lease-seconds", "2", "--json"
        ),
        env=env(2, root),
    )
    assert rescue.p.wait(timeout=600) == 0, "\n".join(rescue.lines[-30:])
    assert result(rescue)["job_complete"]
    for stale in left:
        taken = q.read_done(store, "j", stale.unit)
        assert taken.worker == "rescue" and taken.attempt == 2
    dead_tags = [f".a1-{stale.nonce[:8]}." for stale in left]
    for u in range(3):  # every done record lists one attempt's shards, none of a dead attempt's
        rec = q.read_done(store, "j", u)
        tags = {s.name.split(".")[1] for s in rec.shards}
        assert len(tags) == 1 and tags.pop().startswith(f"a{rec.attempt}-")
        assert not any(tag in s.name for s in rec.shards for tag in dead_tags)
    rep = verify(store, "j", clean=True)  # the dead attempt's uploaded parts are garbage
    assert rep.ok, rep.problems
