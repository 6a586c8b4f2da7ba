"""bootstrap/startup.sh run for real in a temporary root, as a TPU VM image would run it, installing from a
release that `actfleet release` really built and published to a GCS fake.

The image's facts are modelled, not assumed away: its `python3` is 3.10 (it may run stdlib code, which is
checked to parse as 3.10, and nothing else: no pip), there is no route to a package index or a git host (a
`git` stand-in fails loudly if called), and there is no systemd. The release is the real thing, built by
actfleet.infra.release from a git repository with two commits: a hashed lock over small wheels made on the spot,
the project's wheel built by pip from the commit, a uv wheel whose one binary is the uv stand-in, and a CPython
archive in uv's mirror layout. It is read through the storage JSON API of tests/fakes/gcs_server.py, which
answers only requests carrying the VM's bearer token (from the metadata directory or server). Stand-ins, each
recording its calls: the metadata server (a directory, or a loopback HTTP server), `python3`, `uv` (its
`python install` checks the file:// mirror holds the pinned archive and provides this machine's real 3.11
interpreter; `venv` runs that interpreter's venv module; `pip sync` / `pip install` run this machine's real pip
with --no-index --require-hashes against the release's files), useradd and systemctl (whose `start` runs the
bootstrap unit's ExecStart once, as systemd would). Everything else - curl, sha256sum, bash and the script's
own logic (which interpreter, when to retry, what to skip) - is the real thing.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from actfleet.config import parse
from actfleet.infra import release as rel
from actfleet.infra.startup_script import worker_metadata
from tests.fakes.gcs_server import FakeGcs
from tests.fakes.metadata_server import serve_attributes
from tests.fakes.release_parts import lock_text, make_wheel

ROOT = Path(__file__).resolve().parent.parent
STARTUP = ROOT / "bootstrap" / "startup.sh"
UNIT = ROOT / "bootstrap" / "actfleet-worker.service"
PINNED_PYTHON = (ROOT / "bootstrap" / "python-version").read_text().strip()
PINNED_UV = re.search(r"^uv==(\S+)", (ROOT / "bootstrap" / "requirements-uv.txt").read_text(), re.M)[1]
BUCKET = "my-project-acts"
TOKEN = "ya29.test-token-never-logged"
ARCHIVE = f"cpython-{PINNED_PYTHON}+20261101-x86_64-unknown-linux-gnu-install_only_stripped.tar.gz"


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# Shared by the Python stand-ins: one log line per call (in $ACTFLEET_TEST_STATE/calls.log); `fail_once(name)`
# fails a call the first time it is made when the test asked for that (ACTFLEET_TEST_FAIL_ONCE names the calls).
STANDIN_PRELUDE = """
import os, sys
from pathlib import Path
STATE = Path(os.environ.get("ACTFLEET_TEST_STATE", "/nonexistent"))
def record(line):
    with open(STATE / "calls.log", "a") as f:
        f.write(line + "\\n")
def fail_once(name, message, code=1):
    flag = STATE / ("failed-" + name.replace(" ", "-"))
    if name in os.environ.get("ACTFLEET_TEST_FAIL_ONCE", "").split(",") and not flag.exists():
        flag.touch()
        print(message, file=sys.stderr)
        sys.exit(code)
"""

# The image's python3: it reports 3.10 and runs only stdlib code given with -c (checked to parse as 3.10, run
# isolated by this machine's interpreter); anything else - pip, a module, a script - it refuses.
PYTHON3 = """
args = sys.argv[1:]
if args in (["--version"], ["-V"]):
    print("Python 3.10.12")
elif args[:1] == ["-c"]:
    import ast
    ast.parse(args[1], feature_version=(3, 10))
    record("python3 -c <" + ("unpack uv" if "zipfile" in args[1] else "code") + ">")
    os.execv({real_python!r}, [{real_python!r}, "-I", "-c", *args[1:]])
else:
    sys.exit("python3 (the image's 3.10) cannot do: " + " ".join(args))
"""

# uv, as far as the bootstrap uses it. `python install` reads only the file:// mirror (the release) and links
# this machine's real 3.11 interpreter; `pip` runs the real pip, index-less and hash-checked.
UV = """
args = sys.argv[1:]
if args == ["--version"]:
    print("uv @VERSION@ (stand-in)")
    sys.exit(0)
installs = Path(os.environ["UV_PYTHON_INSTALL_DIR"])
if args[:2] == ["python", "find"]:
    assert "--managed-python" in args, args
    found = installs / ("cpython-" + args[-1] + "-linux-x86_64-gnu") / "bin" / "python3"
    if not found.exists():
        sys.exit("error: No interpreter found for Python " + args[-1] + " in managed installations")
    print(found)
    sys.exit(0)
record("uv " + " ".join(args))
real_pip = [{real_python!r}, "-m", "pip", "--disable-pip-version-check", "-q"]
if args[:2] == ["python", "install"]:
    fail_once("uv python install", "error: Failed to download cpython: connection timed out")
    mirror = os.environ.get("UV_PYTHON_INSTALL_MIRROR", "")
    assert mirror.startswith("file://"), "uv would download from GitHub: " + mirror
    archives = list(Path(mirror[len("file://"):]).glob("*/cpython-" + args[-1] + "+*-x86_64-unknown-linux-gnu-install_only*.tar.gz"))
    assert len(archives) == 1, archives
    bindir = installs / ("cpython-" + args[-1] + "-linux-x86_64-gnu") / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3").symlink_to({real_python!r})
elif args[0] == "venv":
    python, venv = args[args.index("--python") + 1], args[-1]
    os.execv(python, [python, "-m", "venv", "--without-pip", venv])
elif args[:2] in (["pip", "sync"], ["pip", "install"]):
    if args[1] == "sync":
        fail_once("uv pip sync", "error: Failed to read jaxlib: No such file or directory")
    assert "--no-index" in args and "--require-hashes" in args, args
    python, links = args[args.index("--python") + 1], args[args.index("--find-links") + 1]
    req = args[-1]
    extra = ["--no-deps"]
    os.execv(real_pip[0], [*real_pip, "--python", python, "install", "--no-index", "--find-links", links,
                          "--require-hashes", *extra, "-r", req])
else:
    sys.exit("uv stand-in: unexpected " + " ".join(args))
"""


def python_standin(path: Path, body: str, **fmt) -> Path:
    return executable(path, f"#!{sys.executable}\n" + STANDIN_PRELUDE + body.format(**fmt))


PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "actfleet"
version = "0.1.{n}"

[project.scripts]
actfleet = "actfleet_stub:main"

[tool.setuptools]
py-modules = ["actfleet_stub"]
"""


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """A repository with two commits, a wheelhouse and CPython archive, and both commits' releases published
    to a GCS fake by the real `release()`. Yields (fake, repo, commits, wheelhouse, archive)."""
    tmp = tmp_path_factory.mktemp("releases")
    wheelhouse = tmp / "wheelhouse"
    deps = [make_wheel(wheelhouse, "tinydep", "1.0", {"tinydep.py": "VALUE = 1\n"}),
            make_wheel(wheelhouse, "tiny-other", "2.0", {"tiny_other.py": "VALUE = 2\n"})]  # fmt: skip
    # The uv stand-in ships as a uv wheel, binary in uv-X.data/scripts/, as the real one does.
    uv_body = (f"#!{sys.executable}\n" + STANDIN_PRELUDE + UV.format(real_python=sys.executable)).replace(
        "@VERSION@", PINNED_UV
    )
    uv_wheel = make_wheel(
        wheelhouse, "uv", PINNED_UV, {f"uv-{PINNED_UV}.data/scripts/uv": uv_body},
        tag="py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64",
    )  # fmt: skip
    archive = tmp / ARCHIVE
    archive.write_bytes(b"not a real CPython: the uv stand-in only checks where it is\n")
    repo = tmp / "repo"
    (repo / "bootstrap").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "bootstrap" / "python-version").write_text(PINNED_PYTHON + "\n")
    (repo / "bootstrap" / "requirements-tpu.txt").write_text(
        lock_text({"tinydep": ("1.0", [deps[0]]), "tiny-other": ("2.0", [deps[1]])})
    )
    (repo / "bootstrap" / "requirements-uv.txt").write_text(lock_text({"uv": (PINNED_UV, [uv_wheel])}))
    (repo / "actfleet_stub.py").write_text("def main():\n    print('actfleet stand-in')\n")
    commits = []
    for n in range(2):
        (repo / "pyproject.toml").write_text(PYPROJECT.format(n=n))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"commit {n}")
        commits.append(git(repo, "rev-parse", "HEAD"))
    git(repo, "tag", "v1")
    fake = FakeGcs.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", fake.url)
        mp.setenv("GOOGLE_CLOUD_PROJECT", "actfleet-test")
        for commit in commits:
            done = rel.release(_config(repo, commit), repo, wheelhouse=wheelhouse, python_archive=archive)
            assert done.published
    fake.bearer = TOKEN  # from here on, like a private bucket: only the VM's token reads it
    yield fake, repo, commits
    fake.stop()


def _config(repo: Path, commit: str, url: str | None = None):
    return parse(
        {
            "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
            "repo": {"url": url or str(repo), "commit": commit},
            "storage": {"bucket": BUCKET},
            "job": {"name": "resid", "model": "m", "input": "i", "layers": [1]},
        }
    )


@pytest.fixture
def vm(tmp_path, releases):
    """A fake TPU VM: metadata directory (with a token), the image's python3 and the stand-ins."""
    fake, repo, commits = releases
    first = commits[0]
    config_file = tmp_path / "bucket-fleet.toml"
    config_file.write_text('[fleet]\nid = "acts"\n')
    state = tmp_path / "standins"
    state.mkdir()
    log = state / "calls.log"
    image_bin = tmp_path / "image-bin"  # first on PATH: what the image has that this machine has differently
    image_bin.mkdir()
    python_standin(image_bin / "python3", PYTHON3, real_python=sys.executable)
    executable(image_bin / "git", f'#!/usr/bin/env bash\necho "git $*" >> {log}\nexit 1\n')
    executable(image_bin / "pip", f'#!/usr/bin/env bash\necho "pip $*" >> {log}\nexit 1\n')
    useradd = executable(
        state / "useradd",
        f"""#!/usr/bin/env bash
# Stands in for useradd: records the call and adds the passwd line the real one would.
echo "useradd $*" >> {log}
mkdir -p "$ACTFLEET_ROOT/etc"
echo "${{@: -1}}:x:999:999::/var/lib/actfleet:/usr/sbin/nologin" >> "$ACTFLEET_ROOT/etc/passwd"
""",
    )
    active = state / "unit-active"
    systemctl = executable(
        state / "systemctl",
        f"""#!/usr/bin/env bash
# Stands in for systemctl: records calls; the worker unit is "active" once restarted or started; starting the
# bootstrap unit runs its ExecStart (synchronously: the test waits for what systemd would run in the background).
echo "systemctl $*" >> {log}
case "$1" in
  is-active) [ -f {active} ];;
  restart) touch {active};;
  enable) [ "${{2:-}}" = "--now" ] && touch {active}; true;;
  start)
    unit="$ACTFLEET_ROOT/etc/systemd/system/${{@: -1}}"
    exec_start="$(sed -n 's/^ExecStart=//p' "$unit")"
    rc=0; $exec_start || rc=$?
    echo "bootstrap exited $rc" >> {log};;
esac
""",
    )
    metadata = tmp_path / "metadata"
    (metadata / "service-accounts" / "default").mkdir(parents=True)
    (metadata / "service-accounts" / "default" / "token").write_text(
        json.dumps({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"})
    )
    config = _config(repo, first)
    for key, value in worker_metadata(config, config.fleet.workers[0]).items():
        (metadata / key).write_text(value)
    (metadata / "actfleet-config").write_text(str(config_file))  # a path stands in for gs:// (one test reads gs://)

    class VM:
        root = tmp_path / "root"
        gcs = fake
        metadata_dir = metadata

        def __init__(self):
            self.commits = tuple(commits)

        def set_commit(self, commit: str) -> None:
            cfg = _config(repo, commit)
            for key, value in worker_metadata(cfg, cfg.fleet.workers[0]).items():
                if key != "actfleet-config":
                    (metadata / key).write_text(value)

        def run(self, env_changes=None, **metadata_changes):
            for key, value in metadata_changes.items():
                (metadata / key).write_text(value)
            env = {
                **os.environ,
                "PATH": f"{image_bin}:{os.environ['PATH']}",
                "ACTFLEET_ROOT": str(self.root),
                "ACTFLEET_METADATA_DIR": str(metadata),
                "ACTFLEET_STORAGE_URL": fake.url,
                "ACTFLEET_SYSTEMCTL": str(systemctl),
                "ACTFLEET_USERADD": str(useradd),
                "ACTFLEET_ATTEMPTS": "3",
                "ACTFLEET_RETRY_DELAY": "0",
                "ACTFLEET_TEST_STATE": str(state),
                **(env_changes or {}),
            }
            for name in ("ACTFLEET_PYTHON", "ACTFLEET_PIP", "VIRTUAL_ENV", "UV_PYTHON_INSTALL_DIR",
                         "STORAGE_EMULATOR_HOST", "PIP_INDEX_URL", "PIP_FIND_LINKS"):  # fmt: skip
                env.pop(name, None)  # nothing of this machine's Python set-up may leak into the "VM"
            return subprocess.run(["bash", str(STARTUP)], env=env, capture_output=True, text=True, timeout=180)

        def calls(self, tool: str | None = None) -> list[str]:
            lines = log.read_text().splitlines() if log.exists() else []
            return [c for c in lines if tool is None or c.split()[0] == tool]

        def stop_unit(self):
            active.unlink(missing_ok=True)

    return VM()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under root outside .git: equal snapshots mean nothing was rewritten."""
    out = {}
    for path in sorted(root.rglob("*")):
        if ".git" in path.parts or path.name == "startup.lock" or path.is_dir():
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    return out


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys such as Environment= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


WORKER_START = [
    "systemctl daemon-reload",
    "systemctl enable actfleet-worker.service",
    "systemctl restart actfleet-worker.service",
]
BOOT_START = ["systemctl daemon-reload", "systemctl start --no-block actfleet-bootstrap.service"]


def install_calls(root: Path, commit: str, *, uv: bool = True, python: bool = True) -> list[str]:
    """What a first install of `commit`'s release calls, in order (uv unpacked, CPython, venv, two installs)."""
    rel_dir = f"{root}/opt/actfleet/releases/{commit}"
    venv = f"{root}/opt/actfleet/venv"
    py = f"{root}/opt/actfleet/python/cpython-{PINNED_PYTHON}-linux-x86_64-gnu/bin/python3"
    return [
        *(["python3 -c <unpack uv>"] if uv else []),
        *([f"uv python install --no-bin {PINNED_PYTHON}"] if python else []),
        f"uv venv -q --python {py} {venv}",
        f"uv pip sync -q --python {venv}/bin/python --no-index --find-links {rel_dir}/wheels --require-hashes "
        f"{rel_dir}/requirements-tpu.txt",
        f"uv pip install -q --python {venv}/bin/python --no-deps --no-index --find-links {rel_dir}/actfleet "
        f"--require-hashes -r {rel_dir}/requirements-actfleet.txt",
    ]


def release_objects(fake: FakeGcs, commit: str) -> set[str]:
    return {name for (_, name) in fake.objects if name.startswith(f"actfleet/releases/{commit}/")}


def test_first_boot_installs_from_the_bucket_and_second_boot_is_a_no_op(vm):
    first = vm.run()
    assert first.returncode == 0, first.stderr
    root = vm.root
    venv = root / "opt/actfleet/venv"
    assert (venv / ".actfleet-commit").read_text().split()[0] == vm.commits[0]
    # The real pip installed the release's wheels (hash-checked, no index) into the venv: the project's wheel
    # of the pinned commit (version 0.1.0) and the locked packages.
    site = next((venv / "lib").glob("python3.*/site-packages"))
    assert {p.name for p in site.glob("*.dist-info")} == {
        "actfleet-0.1.0.dist-info",
        "tinydep-1.0.dist-info",
        "tiny_other-2.0.dist-info",
    }
    out = subprocess.run([str(venv / "bin/actfleet")], capture_output=True, text=True)
    assert out.stdout == "actfleet stand-in\n"
    assert not (root / "opt/actfleet/src").exists()  # no checkout on the VM
    assert (root / "etc/actfleet/fleet.toml").read_text() == '[fleet]\nid = "acts"\n'
    env = (root / "etc/actfleet/worker.env").read_text()
    assert env == (
        f"ACTFLEET_WORKER=tpu-us-central1-a-0\nACTFLEET_CONFIG={root}/etc/actfleet/fleet.toml\nACTFLEET_JOB=resid\n"
    )
    unit = (root / "etc/systemd/system/actfleet-worker.service").read_text()
    assert "@ROOT@" not in unit
    assert (
        f"ExecStart={root}/opt/actfleet/venv/bin/actfleet work --config ${{ACTFLEET_CONFIG}} "
        f"--worker-id ${{ACTFLEET_WORKER}}" in unit
    )
    assert vm.calls() == [
        *BOOT_START,
        *install_calls(root, vm.commits[0]),
        "useradd --system --user-group --no-create-home --home-dir /var/lib/actfleet --shell /usr/sbin/nologin "
        "actfleet",
        *WORKER_START,
        "bootstrap exited 0",
    ]
    # Every object of the release was read, with the VM's token (the fake refuses anonymous reads).
    assert set(vm.gcs.media) >= release_objects(vm.gcs, vm.commits[0])

    before, n = snapshot(root), len(vm.calls())
    reads = sum(map(len, vm.gcs.media.values()))
    second = vm.run()
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert snapshot(root) == before  # no file rewritten, no reinstall, no second user
    assert sum(map(len, vm.gcs.media.values())) == reads  # the release is not fetched again
    assert vm.calls()[n:] == [
        "systemctl start --no-block actfleet-bootstrap.service",
        "systemctl is-active --quiet actfleet-worker.service",
        "bootstrap exited 0",
    ]


def test_the_vm_reaches_no_index_no_repository_and_the_images_python_never_runs_actfleet(vm):
    result = vm.run()
    assert result.returncode == 0, result.stderr
    assert vm.calls("git") == [] and vm.calls("pip") == []  # the image's git and pip are never called
    assert [c for c in vm.calls("python3")] == ["python3 -c <unpack uv>"]  # stdlib only, no pip
    venv_python = vm.root / "opt/actfleet/venv/bin/python"
    version = subprocess.run(
        [str(venv_python), "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert tuple(map(int, version)) >= (3, 11)
    cfg = (vm.root / "opt/actfleet/venv/pyvenv.cfg").read_text()
    assert f"{vm.root}/opt/actfleet/python/cpython-{PINNED_PYTHON}" in cfg  # uv's managed CPython, not the image's
    uv = subprocess.run([str(vm.root / "opt/actfleet/uv/bin/uv"), "--version"], capture_output=True, text=True)
    assert uv.stdout.startswith(f"uv {PINNED_UV} ")


@pytest.mark.parametrize("step", ["uv python install", "uv pip sync"])
def test_a_failed_step_is_retried_by_the_unit_and_the_second_attempt_completes(vm, step):
    result = vm.run({"ACTFLEET_TEST_FAIL_ONCE": step})
    assert result.returncode == 0, result.stderr
    assert "attempt 1 failed (exit 1): retrying" in result.stderr and "attempt 2 failed" not in result.stderr
    calls = vm.calls()
    assert calls[-1] == "bootstrap exited 0" and calls[-4:-1] == WORKER_START
    assert sum(c.startswith(step + " ") for c in calls) == 2  # the failed step ran again, and once more only
    assert (vm.root / "opt/actfleet/venv/.actfleet-commit").exists()
    if step == "uv pip sync":  # the half-built venv was not trusted: built again from scratch
        assert sum(c.startswith("uv venv ") for c in calls) == 2


def test_a_storage_blip_is_retried_by_curl_within_the_attempt(vm):
    vm.gcs.fail_next(2, 503)
    result = vm.run()
    assert result.returncode == 0, result.stderr
    assert "attempt 1 failed" not in result.stderr
    assert vm.calls()[-1] == "bootstrap exited 0"


def test_the_unit_gives_up_after_its_attempts_and_a_restart_finishes(vm):
    """Every attempt fails: the unit exits 1 with nothing half-installed; systemd's restart (here: the next
    start) completes."""
    result = vm.run({"ACTFLEET_TEST_FAIL_ONCE": "uv pip sync", "ACTFLEET_ATTEMPTS": "1"})
    assert result.returncode == 0, result.stderr  # the guest agent's part only starts the unit
    assert "attempt 1 failed (exit 1): giving up; systemd restarts the unit" in result.stderr
    assert vm.calls()[-1] == "bootstrap exited 1"
    assert not (vm.root / "opt/actfleet/venv/.actfleet-commit").exists()
    assert "systemctl restart actfleet-worker.service" not in vm.calls()
    again = vm.run()
    assert again.returncode == 0, again.stderr
    assert vm.calls()[-4:] == [*WORKER_START, "bootstrap exited 0"]


def test_bad_input_inside_the_unit_is_not_retried(vm):
    result = vm.run(**{"actfleet-config": "ftp://example.com/fleet.toml"})
    assert "actfleet-config = 'ftp://example.com/fleet.toml'" in result.stderr
    assert "attempt 1: bad input (exit 2): not retrying" in result.stderr
    assert (
        vm.calls()[-1] == "bootstrap exited 2"
        and vm.calls("uv").count(f"uv python install --no-bin {PINNED_PYTHON}") == 1
    )


def test_a_stopped_unit_is_started_without_reinstalling(vm):
    assert vm.run().returncode == 0
    n = len(vm.calls())
    vm.stop_unit()
    result = vm.run()
    assert result.returncode == 0, result.stderr
    assert vm.calls()[n:] == [
        "systemctl start --no-block actfleet-bootstrap.service",
        "systemctl is-active --quiet actfleet-worker.service",
        "systemctl enable --now actfleet-worker.service",
        "bootstrap exited 0",
    ]


def test_a_new_pinned_commit_installs_its_release_and_restarts(vm):
    assert vm.run().returncode == 0
    n = len(vm.calls())
    vm.set_commit(vm.commits[1])
    result = vm.run()
    assert result.returncode == 0, result.stderr
    venv = vm.root / "opt/actfleet/venv"
    assert (venv / ".actfleet-commit").read_text().split()[0] == vm.commits[1]
    site = next((venv / "lib").glob("python3.*/site-packages"))
    assert (site / "actfleet-0.1.1.dist-info").is_dir()  # the second commit's wheel
    # uv and the interpreter are already there at their pinned versions: only the venv is rebuilt.
    assert vm.calls()[n:] == [
        "systemctl start --no-block actfleet-bootstrap.service",
        *install_calls(vm.root, vm.commits[1], uv=False, python=False),
        "systemctl enable actfleet-worker.service",
        "systemctl restart actfleet-worker.service",
        "bootstrap exited 0",
    ]


@pytest.mark.parametrize("ref", ["main", "v1", "HEAD", "0123456", "0123456789ABCDEF0123456789ABCDEF01234567"])
def test_a_moving_or_ambiguous_ref_is_refused(vm, ref):
    result = vm.run(**{"actfleet-commit": ref})
    assert result.returncode == 2
    assert f"actfleet-commit = '{ref}'" in result.stderr and "refusing a moving ref" in result.stderr
    assert not (vm.root / "opt").exists() and vm.calls() == []


def test_reads_the_metadata_server_with_its_header_and_its_token(vm):
    """The VM path: attributes and the access token over HTTP from a metadata server that insists on
    Metadata-Flavor: Google."""

    def lookup(key):
        path = vm.metadata_dir / key
        return path.read_bytes() if path.is_file() else None

    with serve_attributes(lookup, token=TOKEN) as (url, served):
        result = vm.run({"ACTFLEET_METADATA_DIR": "", "ACTFLEET_METADATA_URL": url})
    assert result.returncode == 0, result.stderr
    assert ("actfleet-commit", 200) in served and ("actfleet-release", 200) in served and ("token", 200) in served
    assert "ACTFLEET_WORKER=tpu-us-central1-a-0" in (vm.root / "etc/actfleet/worker.env").read_text()


def test_the_fleet_config_is_read_from_the_bucket_with_the_token(vm):
    vm.gcs.objects[(BUCKET, "actfleet/acts/fleet.toml")] = vm.gcs.objects[
        next(k for k in vm.gcs.objects if k[1].endswith("/python-version"))
    ].__class__(BUCKET, "actfleet/acts/fleet.toml", b'[fleet]\nid = "from-gcs"\n', 1, 1, "application/toml", "")
    result = vm.run(**{"actfleet-config": f"gs://{BUCKET}/actfleet/acts/fleet.toml"})
    assert result.returncode == 0, result.stderr
    assert (vm.root / "etc/actfleet/fleet.toml").read_text() == '[fleet]\nid = "from-gcs"\n'


def test_missing_metadata_is_named(vm, tmp_path):
    (tmp_path / "metadata" / "actfleet-worker").unlink()
    result = vm.run()
    assert result.returncode == 2
    assert "instance metadata 'actfleet-worker' is missing" in result.stderr


def test_a_commit_without_a_published_release_fails_and_installs_nothing(vm):
    commit = "f" * 40
    result = vm.run(**{"actfleet-commit": commit, "actfleet-release": f"gs://{BUCKET}/actfleet/releases/{commit}/"})
    assert result.returncode == 0, result.stderr  # the guest agent's part; the unit is what fails
    assert f"cannot read gs://{BUCKET}/actfleet/releases/{commit}/SHA256SUMS" in result.stderr
    assert "attempt 3 failed (exit 1): giving up" in result.stderr  # a release may still be on its way: retried
    assert not (vm.root / f"opt/actfleet/releases/{commit}").exists()
    assert vm.calls() == [*BOOT_START, "bootstrap exited 1"]  # nothing installed, nothing started


def test_a_release_file_that_differs_from_its_sum_is_refused(vm):
    key = next(k for k in vm.gcs.objects if k[1].startswith(f"actfleet/releases/{vm.commits[0]}/wheels/tinydep"))
    obj = vm.gcs.objects[key]
    good = obj.data
    obj.data = good[:-1] + bytes([good[-1] ^ 1])
    try:
        result = vm.run({"ACTFLEET_ATTEMPTS": "1"})
    finally:
        obj.data = good
    assert "does not match its SHA256SUMS" in result.stderr and "refusing it" in result.stderr
    assert not (vm.root / f"opt/actfleet/releases/{vm.commits[0]}").exists()
    assert vm.calls() == [*BOOT_START, "bootstrap exited 1"]


@pytest.mark.parametrize(
    "key,value",
    [
        ("actfleet-job", "resid\nLD_PRELOAD=/tmp/evil.so"),
        ("actfleet-job", "resid\rLD_PRELOAD=/tmp/evil.so"),
        ("actfleet-worker", "tpu-us-central1-a-0\nLD_PRELOAD=/tmp/evil.so"),
        ("actfleet-config", "/etc/fleet.toml\nLD_PRELOAD=/tmp/evil.so"),
        ("actfleet-job", "LD_PRELOAD=/tmp/evil.so"),
    ],
)
def test_metadata_cannot_inject_lines_into_the_worker_environment(vm, key, value):
    """Issue 27.15: an attribute with a newline (or an `=` line of its own) is refused before anything is
    written; worker.env only ever holds the three lines it is made of."""
    result = vm.run(**{key: value})
    assert result.returncode == 2, result.stderr
    assert f"'{key}'" in result.stderr or f"{key} = " in result.stderr
    assert not (vm.root / "etc/actfleet/worker.env").exists() and vm.calls() == []


def test_the_storage_seam_cannot_point_a_vm_elsewhere(vm):
    for url in ("https://evil.example.com", "http://10.0.0.5:80", "http://127.0.0.1.evil.com:80"):
        result = vm.run({"ACTFLEET_STORAGE_URL": url})
        assert result.returncode == 2 and "only a loopback" in result.stderr, url
    assert vm.calls() == []


def test_no_credential_reaches_the_vm_or_its_log(vm, releases):
    """Issue 27.15: a repository URL carrying a token never reaches the metadata (the VM does not fetch the
    repository), and the VM's access token appears in no log line and no command line."""
    _, repo, commits = releases
    secret = "ghp_s3cretT0ken"
    cfg = _config(repo, commits[0], url=f"https://x-access-token:{secret}@github.com/org/private.git")
    md = worker_metadata(cfg, cfg.fleet.workers[0])
    assert not [k for k, v in md.items() if secret in v or "org/private" in v]
    result = vm.run()
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert not [c for c in vm.calls() if TOKEN in c]
    assert rel.redact(cfg.repo.url) == "https://***@github.com/org/private.git"


def test_the_worker_runs_unprivileged_under_systemd_hardening(vm):
    """Statically, the unit as shipped; and as installed by a real run, with the user the bootstrap created."""
    service = unit_file(UNIT)["Service"]
    assert service["User"] == ["actfleet"] and service["Group"] == ["actfleet"]
    assert "root" not in service["User"] + service["Group"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "RestrictSUIDSGID"):
        assert service[key] == ["true"], key
    assert service["ProtectSystem"] == ["strict"]
    # ProtectSystem=strict leaves writable only these (systemd creates them owned by User=):
    assert service["StateDirectory"] == ["actfleet"] and service["CacheDirectory"] == ["actfleet"]
    assert service["WorkingDirectory"] == ["@ROOT@/var/lib/actfleet"]
    cache_env = [e for e in service["Environment"] if e.split("=")[0].endswith(("_CACHE", "CACHE_HOME"))]
    assert cache_env and all("=@ROOT@/var/cache/actfleet" in e for e in cache_env)
    assert "PrivateDevices" not in service  # the TPU's device nodes must stay visible
    assert service["LimitMEMLOCK"] == ["infinity"]  # root's CAP_IPC_LOCK is gone; services skip limits.conf

    assert vm.run().returncode == 0
    installed = unit_file(vm.root / "etc/systemd/system/actfleet-worker.service")["Service"]
    assert installed["User"] == ["actfleet"]
    assert (vm.root / "etc/passwd").read_text().splitlines() == [
        "actfleet:x:999:999::/var/lib/actfleet:/usr/sbin/nologin"
    ]
    for path in ("etc/actfleet/fleet.toml", "etc/actfleet/worker.env"):  # readable by the worker, not writable
        assert stat.S_IMODE((vm.root / path).stat().st_mode) == 0o644


def test_the_bootstrap_unit_retries_forever_but_not_bad_input(vm):
    assert vm.run().returncode == 0
    path = vm.root / "etc/systemd/system/actfleet-bootstrap.service"
    unit = unit_file(path)
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    service = unit["Service"]
    assert service["Type"] == ["oneshot"] and service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
    assert service["ExecStart"] == [f"{vm.root}/opt/actfleet/bootstrap/startup.sh bootstrap"]
    assert (vm.root / "opt/actfleet/bootstrap/startup.sh").read_text() == STARTUP.read_text()
    assert "User" not in service  # the bootstrap is root's: it installs packages and the worker's user
    assert service["Environment"] == ["HOME=/root"] and service["TimeoutStartSec"] == ["infinity"]


def test_the_script_is_valid_bash_reaches_only_google_and_the_metadata_carries_bootstrap_verbatim():
    assert subprocess.run(["bash", "-n", str(STARTUP)]).returncode == 0
    code = [line for line in STARTUP.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\|\s*(ba)?sh\b", line)]  # nothing piped into a shell
    # Issue 24.1: the only hosts a VM is told to reach are the metadata server and the storage API (the
    # loopback seam accepts a test's fake only).
    hosts = {m[1].replace("\\", "") for m in re.finditer(r"https?://([^/:\s\"')}]+)", STARTUP.read_text())}
    assert hosts == {"metadata.google.internal", "storage.googleapis.com", "127.0.0.1"}, hosts
    own = re.sub(r'"\$UV" pip', "", "\n".join(code))  # uv's pip interface, index-less (build_venv)
    assert not re.search(r"\b(git|apt-get|pip)\b +(clone|fetch|install|download)", own)
    config = _config(Path("/nonexistent"), "a" * 40, url="https://example.com/r.git")
    md = worker_metadata(config, config.fleet.workers[0])
    assert md["startup-script"] == STARTUP.read_text() and md["actfleet-unit"] == UNIT.read_text()
    assert md["actfleet-release"] == f"gs://{BUCKET}/actfleet/releases/{'a' * 40}/"
