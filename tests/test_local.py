"""`actfleet local`: the process fleet driven by decide(), chaos, and the whole system end to end.

The driver tests use real child processes (a Python one-liner that sleeps, or exits with a given code), real
signals and the real decide(); the end-to-end tests run `actfleet local` itself as a subprocess on the tiny
random model and check its summary against the shards on disk, read back with actfleet.worker.reader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actfleet.demo.process_fleet import Chaos, ProcessFleet, local_workers, popen_logged
from actfleet.infra.decide import CREATE, REMOVE, REPLACE

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# The process fleet and decide()
# ----------------------------------------------------------------------------------------------------


def sleeper(seconds: float = 60.0, code: int = 0):
    """A spawn function whose workers sleep, then exit with `code`; it records what it started."""
    started = []

    def spawn(worker, incarnation, log_path):
        started.append((worker.name, incarnation))
        script = (
            f"import sys, time; print('{worker.name} #{incarnation}', flush=True); time.sleep({seconds}); "
            f"sys.exit({code})"
        )
        return popen_logged([sys.executable, "-c", script], log_path)

    return spawn, started


def wait_exit(fleet: ProcessFleet, name: str) -> None:
    fleet.slots[name].proc.wait(timeout=120)  # a hang guard, not a speed check


def wait_until(condition, describe, limit: float = 300, poll: float = 0.05) -> None:
    """Poll until `condition()`; `limit` only guards against a hang (it is no speed check), so it is generous."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {limit:.0f} s: {describe()}")
        time.sleep(poll)


def wait_for_log(path: Path, text: str) -> None:
    wait_until(lambda: path.is_file() and text in path.read_text(), lambda: f"{path} never said {text!r}")


@pytest.fixture
def fleet_of(tmp_path):
    fleets = []

    def make(n, spawn, **kw):
        f = ProcessFleet(local_workers(n), spawn, log_dir=tmp_path / "logs", stop_grace_s=5, **kw)
        fleets.append(f)
        return f

    yield make
    for f in fleets:
        f.stop_all()


def test_first_pass_creates_every_worker_and_a_second_changes_nothing(fleet_of):
    spawn, started = sleeper()
    fleet = fleet_of(3, spawn)
    acted = fleet.reconcile()
    assert [(a.worker, a.kind) for a in acted] == [("local-0", CREATE), ("local-1", CREATE), ("local-2", CREATE)]
    assert sorted(fleet.running()) == ["local-0", "local-1", "local-2"]
    assert fleet.reconcile() == []
    assert started == [("local-0", 1), ("local-1", 1), ("local-2", 1)]
    assert fleet.restarts == 0


def test_a_killed_worker_is_a_preempted_node_and_is_replaced_under_its_name(fleet_of, tmp_path):
    spawn, started = sleeper()
    fleet = fleet_of(3, spawn)
    fleet.reconcile()
    wait_for_log(tmp_path / "logs" / "local-1.log", "local-1 #1")
    old_pid = fleet.slots["local-1"].proc.pid
    assert fleet.kill("local-1")
    wait_exit(fleet, "local-1")
    acted = fleet.reconcile()
    assert [(a.worker, a.kind, a.reason) for a in acted] == [("local-1", REPLACE, "node PREEMPTED")]
    assert fleet.slots["local-1"].proc.pid != old_pid and fleet.slots["local-1"].incarnation == 2
    assert started[-1] == ("local-1", 2)
    assert fleet.restarts == 1 and fleet.failures == 0  # the driver's own kill is chaos, not a failure
    assert fleet.restarts_of == {"local-1": 1}
    assert sorted(fleet.running()) == ["local-0", "local-1", "local-2"]
    # Both incarnations wrote to the worker's one log.
    wait_for_log(tmp_path / "logs" / "local-1.log", "local-1 #2")


def test_a_crashing_worker_is_replaced_and_counted_as_a_failure(fleet_of):
    spawn, _ = sleeper(seconds=0, code=3)
    fleet = fleet_of(1, spawn)
    fleet.reconcile()
    wait_exit(fleet, "local-0")
    acted = fleet.reconcile()
    assert [(a.kind, a.reason) for a in acted] == [(REPLACE, "node TERMINATED")]
    assert fleet.failures == 1 and fleet.restarts == 1
    assert any(e.kind == "exit" and e.detail == "exited with code 3" for e in fleet.events)


def test_job_complete_scales_the_fleet_to_zero_and_stops_running_workers(fleet_of):
    spawn, _ = sleeper()
    fleet = fleet_of(2, spawn)
    fleet.reconcile()
    procs = [s.proc for s in fleet.slots.values()]
    acted = fleet.reconcile(job_complete=lambda: True)
    assert sorted((a.worker, a.kind) for a in acted) == [("local-0", REMOVE), ("local-1", REMOVE)]
    assert fleet.slots == {} and all(p.poll() is not None for p in procs)
    assert fleet.reconcile(job_complete=True) == []  # nothing left, nothing created
    assert fleet.restarts == 0


def test_a_worker_that_finished_because_the_job_is_done_is_not_restarted(fleet_of):
    spawn, started = sleeper(seconds=0, code=0)
    fleet = fleet_of(2, spawn)
    fleet.reconcile()
    for name in list(fleet.slots):
        wait_exit(fleet, name)
    # job_complete is asked after observing, as the real loop does
    acted = fleet.reconcile(job_complete=lambda: True)
    assert {a.kind for a in acted} == {REMOVE}
    assert fleet.restarts == 0 and fleet.failures == 0 and len(started) == 2


def test_stop_all_terminates_every_worker_and_kills_those_that_ignore_sigterm(fleet_of):
    def spawn(worker, incarnation, log_path):
        ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if worker.index == 0 else ""
        return popen_logged(
            [sys.executable, "-c", ignore + "print('up', flush=True); import time; time.sleep(60)"], log_path
        )

    fleet = fleet_of(2, spawn)
    fleet.stop_grace_s = 1.0
    fleet.reconcile()
    procs = {n: s.proc for n, s in fleet.slots.items()}
    wait_for_log(fleet.log_dir / "local-0.log", "up")  # the stubborn one has installed its handler
    wait_for_log(fleet.log_dir / "local-1.log", "up")
    fleet.stop_all()
    assert procs["local-0"].returncode == -signal.SIGKILL
    assert procs["local-1"].returncode == -signal.SIGTERM
    assert fleet.slots == {}


# ----------------------------------------------------------------------------------------------------
# Chaos
# ----------------------------------------------------------------------------------------------------


def test_chaos_is_seeded_and_its_rate_is_per_worker_per_second():
    names = [f"local-{i}" for i in range(4)]
    draws_a = Chaos(0.05, seed=7)
    draws_b = Chaos(0.05, seed=7)
    seq_a = [draws_a.victims(names, 0.5) for _ in range(200)]
    seq_b = [draws_b.victims(names, 0.5) for _ in range(200)]
    assert seq_a == seq_b and any(seq_a)
    assert [Chaos(0.05, seed=8).victims(names, 0.5) for _ in range(200)] != seq_a
    # 4 workers x 2,000 s at 5%/s: about 400 kills; a binomial's 5 sigma is about 49
    c = Chaos(0.05, seed=1)
    kills = sum(len(c.victims(names, 1.0)) for _ in range(2000))
    assert 350 <= kills <= 450
    # the rate is per second whatever the tick: 0.25 s ticks give the same expectation
    c = Chaos(0.05, seed=2)
    kills = sum(len(c.victims(names, 0.25)) for _ in range(8000))
    assert 350 <= kills <= 450


def test_chaos_zero_never_kills_and_a_bad_rate_is_refused():
    assert all(Chaos(0.0).victims(["a", "b"], 10.0) == [] for _ in range(100))
    with pytest.raises(ValueError, match="chaos rate 1.5"):
        Chaos(1.5)


# ----------------------------------------------------------------------------------------------------
# actfleet local, end to end (real engine on the tiny random model, real processes, real SIGKILLs)
# ----------------------------------------------------------------------------------------------------


def actfleet(*args: str, pythonpath: tuple[str, ...] = (), **kw) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("ACTFLEET_CONFIG", None)
    if pythonpath:  # only a test's own blockers (base_install_only); actfleet comes from the installed package
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return subprocess.Popen(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def small_dataset(tmp_path: Path, rows: int) -> Path:
    """The first `rows` rows of the bundled dataset, so the test stays about a minute on 2 cores."""
    from actfleet.demo.command import BUNDLED_DATASET

    path = tmp_path / "tales.jsonl"
    path.write_text("".join(BUNDLED_DATASET.read_text().splitlines(keepends=True)[:rows]))
    return path


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (our own temporary paths: nobody else's)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if text in cmd and "zombie" not in state:
                pids.append(int(d.name))
    return pids


def base_install_only(tmp_path: Path) -> str:
    """A sitecustomize that makes torch and cdktf unimportable, as in a base install (`pip install -e .`,
    which `make demo` uses): the local path must not need them. Children inherit it through PYTHONPATH."""
    d = tmp_path / "base-install"
    d.mkdir()
    (d / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('torch', 'cdktf', 'jsii', 'cdktf_cdktf_provider_google', 'cdktf_cdktf_provider_google_beta'):\n"
        "    sys.modules[name] = None\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(d)}, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "torch" in probe.stderr  # the blocker is in effect
    return str(d)


@pytest.mark.slow
def test_local_with_chaos_verifies_and_its_summary_matches_the_shards_on_disk(tmp_path):
    from actfleet.worker.reader import load, shard_metadata

    data = small_dataset(tmp_path, 400)
    out = tmp_path / "out"
    # 0.6 per busy second: a 20-row unit takes about a second here, so kills (and restarts) are all but
    # certain (at 0.3 about one run in twenty saw none); every incarnation still commits a unit first.
    p = actfleet(
        "local",
        "--workers",
        "3",
        "--chaos",
        "0.6",
        "--seed",
        "3",
        "--input",
        str(data),
        "--unit-rows",
        "20",
        "--lease-seconds",
        "6",
        "--out",
        str(out),
        "--json",
        pythonpath=(base_install_only(tmp_path),),
    )
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    s = json.loads(stdout)
    assert s["verified"] and s["problems"] == []
    assert s["random_weights"] and "RANDOM WEIGHTS" in s["model_label"]
    assert s["units"] == s["units_total"] == 20
    assert s["rows"] == 400 == s["rows_stored"] + sum(s["rows_skipped"].values())
    assert s["chaos_kills"] >= 1 and s["restarts"] >= 1, stderr[-3000:]  # recovery was exercised

    # The summary's numbers are the shards on disk, read back with the reader.
    files = sorted(Path(s["shards_dir"]).glob("*.safetensors"))
    assert len(files) == s["shards"] == len(shard_metadata(s["shards_dir"])) > 0
    assert sum(f.stat().st_size for f in files) == s["bytes"]
    acts = load(s["shards_dir"])
    ids, pos = acts["sample_ids"].tolist(), acts["positions"].tolist()
    assert len(ids) == s["tokens"] == len(set(zip(ids, pos))) > 0  # no (sample, position) twice despite kills
    assert len(set(ids)) == s["rows_stored"] and set(ids) <= set(range(400))
    sites = [k for k in acts if k.startswith("blocks.")]
    assert sites and all(acts[k].shape[0] == len(ids) for k in sites)
    # ... and the one-line snippet the summary prints works as shown
    snippet = subprocess.run(
        [sys.executable, "-c", s["load_snippet"]], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert snippet.returncode == 0 and "sample_ids" in snippet.stdout, snippet.stderr
    assert not processes_mentioning(str(out))  # every worker was stopped


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_running_again_resumes_the_job(tmp_path):
    data = small_dataset(tmp_path, 300)
    out = tmp_path / "out"
    args = ("local", "--workers", "2", "--input", str(data), "--unit-rows", "10", "--out", str(out), "--json")
    p = actfleet(*args)
    done_dir = out / "store" / "local" / "done"

    def three_units_done():
        assert p.poll() is None, p.communicate()[1][-3000:]  # it must still be running when we interrupt it
        return done_dir.is_dir() and len(list(done_dir.iterdir())) >= 3

    wait_until(three_units_done, lambda: "fewer than 3 units done", poll=0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-3000:]
    assert "run the same command again to resume" in stderr.lower()
    assert stdout == ""
    assert not processes_mentioning(str(out))
    done_before = {f.name: f.read_bytes() for f in done_dir.iterdir()}
    assert 3 <= len(done_before) < 30

    p = actfleet(*args)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    assert "resuming, " in stderr
    s = json.loads(stdout)
    assert s["verified"] and s["units"] == 30 and s["rows"] == 300
    # the units done before the interruption were kept, not redone
    assert all((done_dir / name).read_bytes() == record for name, record in done_before.items())
    assert s["tokens_this_run"] < s["tokens"]


@pytest.mark.parametrize("flag, value", [("--input", "missing.jsonl"), ("--model", "no-such-model")])
def test_a_missing_input_or_model_is_one_line_naming_it(tmp_path, flag, value):
    p = actfleet("local", flag, str(tmp_path / value), "--out", str(tmp_path / "o"))
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2, stderr
    assert stderr.startswith(f"actfleet: {flag} ") and value in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_workers_that_cannot_start_end_the_run_with_their_error_instead_of_restarting_forever(tmp_path):
    from actfleet.demo.tiny_model import make_tiny_model

    # A model prepare accepts (its files are all there, and prepare pins their hashes) but no worker can
    # load: its weights file is garbage. (A wrong model_type is now refused by prepare itself, in one line.)
    model = make_tiny_model(tmp_path / "broken-weights", seed=0)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    p = actfleet(
        "local", "--workers", "2", "--model", str(model), "--input", str(small_dataset(tmp_path, 20)), "--out", str(out)
    )
    _, stderr = p.communicate(timeout=600)
    assert p.returncode in (1, 2), stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("actfleet: ") and "local-" in last and str(out / "logs") in last, stderr[-3000:]
    assert not processes_mentioning(str(out))


def test_the_printed_load_command_runs_without_the_venv_on_path(tmp_path):
    # A user's shell: PATH without this venv, so `python` is the system's (or absent), which has no actfleet.
    # The command `local` prints names its interpreter by full path, so it still loads the shards.
    import numpy as np

    from actfleet.demo.command import _snippet, load_command
    from actfleet.worker.samples import Batch
    from actfleet.worker.shards import ShardWriter

    batch = Batch(
        token_ids=np.array([5, 6], np.int32),
        sample_ids=np.array([0, 0], np.int64),
        positions=np.arange(2, dtype=np.int32),
        acts={"blocks.0.hook_resid_post": np.ones((2, 4), np.float32)},
    )
    w = ShardWriter(shard_mb=1, model="m", revision="r", job="j", unit=0, sites=list(batch.acts), store_dtype="float32")
    w.add(batch)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in w.close():
        (shards / s.name).write_bytes(s.data)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    bare = subprocess.run(
        ["bash", "-c", f"python3 -c {json.dumps(_snippet(shards))}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bare.returncode != 0  # what the old printed line did here
    ours = subprocess.run(
        ["bash", "-c", load_command(shards)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert ours.returncode == 0 and "sample_ids" in ours.stdout and "(2, 4)" in ours.stdout, ours.stderr
