"""bootstrap/startup.sh run for real in a temporary root, as a TPU VM image would run it.

The image's facts are modelled, not assumed away: its `python3` is 3.10 (with pip only when apt has installed
python3-pip), apt can find its lock held by unattended-upgrades, and there is no systemd. Stand-ins, each
recording its calls: the metadata server (a directory, or a loopback HTTP server), `python3` (3.10: it can
run pip, and pip is where uv comes from), `uv` (the one tool that downloads: interpreters from the
python-build-standalone releases and packages from PyPI; its `python install` provides this machine's real
3.11 interpreter, its `venv` runs that interpreter's real venv module), apt-get, useradd and systemctl (whose
`start` runs the bootstrap unit's ExecStart once, as systemd would). Everything else - git, the real lock
files, bash and the script's own logic (which interpreter, when to retry, what to skip) - is the real thing.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from actfleet.config import parse
from actfleet.infra.startup_script import worker_metadata
from tests.fakes.metadata_server import serve_attributes

ROOT = Path(__file__).resolve().parent.parent
STARTUP = ROOT / "bootstrap" / "startup.sh"
UNIT = ROOT / "bootstrap" / "actfleet-worker.service"
# What a VM reads from the checkout at the pinned commit; the fake repository carries the real files.
LOCK_FILES = ("requirements-uv.txt", "requirements-tpu.txt", "python-version")
PINNED_PYTHON = (ROOT / "bootstrap" / "python-version").read_text().strip()
PINNED_UV = re.search(r"^uv==(\S+)", (ROOT / "bootstrap" / "requirements-uv.txt").read_text(), re.M)[1]
APT_LOCK = "-o DPkg::Lock::Timeout=600"


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


# Shared by the Python stand-ins: one log line per call; `fail_once(name)` fails a call the first time it is
# made when the test asked for that (ACTFLEET_TEST_FAIL_ONCE names the calls, comma-separated).
STANDIN_PRELUDE = """
import os, sys
from pathlib import Path
STATE = Path({state!r})
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

# The image's python3: it reports 3.10 and can only run pip (once apt has installed python3-pip); anything
# else it refuses, so a script that built actfleet's venv with it (or ran actfleet on it) fails here.
PYTHON3 = """
args = sys.argv[1:]
if args in (["--version"], ["-V"]):
    print("Python 3.10.12")
elif args[:2] == ["-m", "pip"] and not (STATE / "image-has-pip").exists():
    sys.exit("/usr/bin/python3: No module named pip")
elif args[:3] == ["-m", "pip", "--version"]:
    print("pip 22.0.2 from /usr/lib/python3/dist-packages/pip (python 3.10)")
elif args[:3] == ["-m", "pip", "install"]:
    record("python3 " + " ".join(args))
    fail_once("pip install", "ERROR: Could not install packages due to an OSError: Connection reset by peer")
    # pip --require-hashes refuses a requirement without a hash, and installs uv's console script into
    # <target>/bin: here a stand-in uv that reports the version the requirements file pins.
    assert "--require-hashes" in args and "--no-deps" in args, args
    req = Path(args[args.index("-r") + 1]).read_text()
    import re
    (version,) = re.findall(r"^uv==(\\S+) \\\\\\n(?:    --hash=sha256:[0-9a-f]{{64}}(?: \\\\)?\\n)+", req, re.M)
    target = Path(args[args.index("--target") + 1])
    (target / "bin").mkdir(parents=True)
    uv = target / "bin" / "uv"
    uv.write_text(Path({uv_standin!r}).read_text().replace("@VERSION@", version))
    uv.chmod(0o755)
else:
    sys.exit("python3 (the image's 3.10) cannot do: " + " ".join(args))
"""

# uv, as far as the bootstrap uses it. Downloads are replaced: `python install` links this machine's real
# 3.11 interpreter, `pip sync` checks the lock is hashed and pinned instead of fetching it.
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
if args[:2] == ["python", "install"]:
    fail_once("uv python install", "error: Failed to download cpython: connection timed out")
    bindir = installs / ("cpython-" + args[-1] + "-linux-x86_64-gnu") / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3").symlink_to({real_python!r})
elif args[0] == "venv":
    python, venv = args[args.index("--python") + 1], args[-1]
    os.execv(python, [python, "-m", "venv", "--without-pip", venv])
elif args[:2] == ["pip", "sync"]:
    fail_once("uv pip sync", "error: Failed to download jaxlib: HTTP status server error (503)")
    assert "--require-hashes" in args, args
    import re
    text = Path(args[-1]).read_text().replace("\\\\\\n", " ")
    reqs = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert reqs and all(re.match(r"^[A-Za-z0-9._-]+==\\S+( +--hash=sha256:[0-9a-f]{{64}})+ *$", r) for r in reqs)
elif args[:2] == ["pip", "install"]:
    assert "--no-deps" in args and "--no-build-isolation" in args, args
    venv = Path(args[args.index("--python") + 1]).parent.parent
    (venv / "bin" / "actfleet").write_text("#!/bin/sh\\necho actfleet \\"$@\\"\\n")
    (venv / "bin" / "actfleet").chmod(0o755)
else:
    sys.exit("uv stand-in: unexpected " + " ".join(args))
"""


def python_standin(path: Path, body: str, state: Path, **fmt) -> Path:
    return executable(path, f"#!{sys.executable}\n" + STANDIN_PRELUDE.format(state=str(state)) + body.format(**fmt))


@pytest.fixture
def vm(tmp_path):
    """A fake TPU VM: repository with two commits, metadata directory, the image's python3 and the stand-ins."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "bootstrap").mkdir()
    (repo / "bootstrap" / "actfleet-worker.service").write_text(UNIT.read_text())
    for name in LOCK_FILES:
        (repo / "bootstrap" / name).write_text((ROOT / "bootstrap" / name).read_text())
    (repo / "pyproject.toml").write_text('[project]\nname = "actfleet"\nversion = "0"\n')
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "README").write_text("second\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "second")
    second = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "v1")

    config_file = tmp_path / "bucket-fleet.toml"
    config_file.write_text('[fleet]\nid = "acts"\n')
    state = tmp_path / "standins"
    state.mkdir()
    log = state / "calls.log"
    image_bin = tmp_path / "image-bin"  # first on PATH: what the image has that this machine has differently
    image_bin.mkdir()
    uv_standin = python_standin(state / "uv-standin", UV, state, real_python=sys.executable)
    python_standin(image_bin / "python3", PYTHON3, state, uv_standin=str(uv_standin))
    apt = executable(
        state / "apt-get",
        f"""#!/usr/bin/env bash
# Stands in for apt-get: records calls; `install` finds the dpkg lock held the first time when asked to.
echo "apt-get $*" >> {log}
if [[ " $* " == *" install "* ]]; then
  if [[ ",$ACTFLEET_TEST_FAIL_ONCE," == *",apt lock,"* && ! -f {state}/failed-apt-lock ]]; then
    touch {state}/failed-apt-lock
    echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1234 (unattended-upgr)" >&2
    exit 100
  fi
  [[ " $* " == *" python3-pip "* ]] && touch {state}/image-has-pip
fi
true
""",
    )
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
    metadata.mkdir()
    config = parse(
        {
            "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
            "repo": {"url": str(repo), "commit": first},
            "storage": {"bucket": "my-project-acts"},
            "job": {"name": "resid", "model": "m", "input": "i", "layers": [1]},
        }
    )
    for key, value in worker_metadata(config, config.fleet.workers[0]).items():
        (metadata / key).write_text(value)
    (metadata / "actfleet-config").write_text(str(config_file))  # a path stands in for gs://

    class VM:
        root = tmp_path / "root"
        commits = (first, second)
        metadata_dir = metadata

        def run(self, env_changes=None, **metadata_changes):
            for key, value in metadata_changes.items():
                (metadata / key).write_text(value)
            env = {
                **os.environ,
                "PATH": f"{image_bin}:{os.environ['PATH']}",
                "ACTFLEET_ROOT": str(self.root),
                "ACTFLEET_METADATA_DIR": str(metadata),
                "ACTFLEET_APT_GET": str(apt),
                "ACTFLEET_SYSTEMCTL": str(systemctl),
                "ACTFLEET_USERADD": str(useradd),
                "ACTFLEET_ATTEMPTS": "3",
                "ACTFLEET_RETRY_DELAY": "0",
                "GIT_CONFIG_NOSYSTEM": "1",
                **(env_changes or {}),
            }
            for name in ("ACTFLEET_PYTHON", "ACTFLEET_PIP", "VIRTUAL_ENV", "UV_PYTHON_INSTALL_DIR"):
                env.pop(name, None)  # nothing of this machine's Python set-up may leak into the "VM"
            return subprocess.run(["bash", str(STARTUP)], env=env, capture_output=True, text=True, timeout=120)

        def calls(self, tool: str | None = None) -> list[str]:
            lines = log.read_text().splitlines() if log.exists() else []
            return [c for c in lines if tool is None or c.split()[0] == tool]

        def image_has_pip(self):
            (state / "image-has-pip").touch()

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


def test_first_boot_sets_up_and_second_boot_is_a_no_op(vm):
    vm.image_has_pip()
    first = vm.run()
    assert first.returncode == 0, first.stderr
    root = vm.root
    src = root / "opt/actfleet/src"
    venv = root / "opt/actfleet/venv"
    assert git(src, "rev-parse", "HEAD") == vm.commits[0]
    assert (venv / ".actfleet-commit").read_text().split()[0] == vm.commits[0]
    assert (venv / "bin/actfleet").exists()
    assert (root / "etc/actfleet/fleet.toml").read_text() == '[fleet]\nid = "acts"\n'
    env = (root / "etc/actfleet/worker.env").read_text()
    assert "ACTFLEET_WORKER=tpu-us-central1-a-0\n" in env  # the worker id reaches `actfleet work`
    assert f"ACTFLEET_CONFIG={root}/etc/actfleet/fleet.toml\n" in env
    unit = (root / "etc/systemd/system/actfleet-worker.service").read_text()
    assert "@ROOT@" not in unit
    assert (
        f"ExecStart={root}/opt/actfleet/venv/bin/actfleet work --config ${{ACTFLEET_CONFIG}} "
        f"--worker-id ${{ACTFLEET_WORKER}}" in unit
    )
    assert "Restart=on-failure" in unit and "StandardOutput=journal" in unit
    python = f"{root}/opt/actfleet/python/cpython-{PINNED_PYTHON}-linux-x86_64-gnu/bin/python3"
    assert vm.calls() == [
        *BOOT_START,
        f"python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary :all: --require-hashes "
        f"--target {root}/opt/actfleet/uv.partial -r {src}/bootstrap/requirements-uv.txt",
        f"uv python install --no-bin {PINNED_PYTHON}",
        f"uv venv -q --python {python} {venv}",
        f"uv pip sync -q --python {venv}/bin/python --require-hashes {src}/bootstrap/requirements-tpu.txt",
        f"uv pip install -q --python {venv}/bin/python --no-deps --no-build-isolation {src}",
        "useradd --system --user-group --no-create-home --home-dir /var/lib/actfleet --shell /usr/sbin/nologin "
        "actfleet",
        *WORKER_START,
        "bootstrap exited 0",
    ]
    assert "apt-get" not in first.stderr and vm.calls("apt-get") == []  # nothing was missing

    before, n = snapshot(root), len(vm.calls())
    second = vm.run()
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert snapshot(root) == before  # no file rewritten, no reinstall, no second user
    # The bootstrap unit is started again; it finds everything in place and leaves the worker running.
    assert vm.calls()[n:] == [
        "systemctl start --no-block actfleet-bootstrap.service",
        "systemctl is-active --quiet actfleet-worker.service",
        "bootstrap exited 0",
    ]


def test_the_images_python_310_never_runs_actfleet(vm):
    """The image's python3 is 3.10 (below actfleet's and jax's floor): the venv gets the pinned 3.11+."""
    vm.image_has_pip()
    assert (
        subprocess.run(
            ["python3", "--version"], capture_output=True, text=True, env={"PATH": str(vm.root.parent / "image-bin")}
        ).stdout
        == "Python 3.10.12\n"
    )
    result = vm.run()
    assert result.returncode == 0, result.stderr
    venv_python = vm.root / "opt/actfleet/venv/bin/python"
    version = subprocess.run(
        [str(venv_python), "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert tuple(map(int, version)) >= (3, 11)
    cfg = (vm.root / "opt/actfleet/venv/pyvenv.cfg").read_text()
    assert f"{vm.root}/opt/actfleet/python/cpython-{PINNED_PYTHON}" in cfg  # uv's managed CPython, not the image's
    # The stand-in pip checked the requirements file's hashes; the installed uv is the pinned one.
    uv = subprocess.run([str(vm.root / "opt/actfleet/uv/bin/uv"), "--version"], capture_output=True, text=True)
    assert uv.stdout.startswith(f"uv {PINNED_UV} ")


def test_an_image_without_pip_gets_it_from_apt_waiting_for_a_held_lock(vm):
    """A fresh image: python3-pip missing and unattended-upgrades holding the dpkg lock at the first try."""
    result = vm.run({"ACTFLEET_TEST_FAIL_ONCE": "apt lock"})
    assert result.returncode == 0, result.stderr
    apt = vm.calls("apt-get")
    assert (
        apt
        == [f"apt-get {APT_LOCK} update -q", f"apt-get {APT_LOCK} install -yq --no-install-recommends python3-pip"] * 2
    )
    assert "attempt 1 failed (exit 100): retrying" in result.stderr
    assert vm.calls()[-1] == "bootstrap exited 0" and (vm.root / "opt/actfleet/venv/bin/actfleet").exists()
    assert vm.calls()[-4:-1] == WORKER_START


@pytest.mark.parametrize("step", ["pip install", "uv python install", "uv pip sync"])
def test_a_failed_download_is_retried_by_the_unit_and_the_second_attempt_completes(vm, step):
    vm.image_has_pip()
    result = vm.run({"ACTFLEET_TEST_FAIL_ONCE": step})
    assert result.returncode == 0, result.stderr
    assert "attempt 1 failed (exit 1): retrying" in result.stderr and "attempt 2 failed" not in result.stderr
    calls = vm.calls()
    assert calls[-1] == "bootstrap exited 0" and calls[-4:-1] == WORKER_START
    call = {"pip install": "python3 -m pip install "}.get(step, step + " ")
    assert sum(c.startswith(call) for c in calls) == 2  # the failed step ran again, and once more only
    assert (vm.root / "opt/actfleet/venv/.actfleet-commit").exists()
    if step == "uv pip sync":  # the half-built venv was not trusted: built again from scratch
        assert sum(c.startswith("uv venv ") for c in calls) == 2


def test_the_unit_gives_up_after_its_attempts_and_a_restart_finishes(vm):
    """Every attempt fails (PyPI down): the unit exits 1 with nothing half-installed; systemd's restart (here:
    the next start) completes once the index answers again."""
    vm.image_has_pip()
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
    vm.image_has_pip()
    result = vm.run(**{"actfleet-config": "ftp://example.com/fleet.toml"})
    assert "actfleet-config = 'ftp://example.com/fleet.toml'" in result.stderr
    assert "attempt 1: bad input (exit 2): not retrying" in result.stderr
    assert (
        vm.calls()[-1] == "bootstrap exited 2"
        and vm.calls("uv").count(f"uv python install --no-bin {PINNED_PYTHON}") == 1
    )


def test_a_stopped_unit_is_started_without_reinstalling(vm):
    vm.image_has_pip()
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


def test_a_new_pinned_commit_is_checked_out_installed_and_restarted(vm):
    vm.image_has_pip()
    assert vm.run().returncode == 0
    n = len(vm.calls())
    result = vm.run(**{"actfleet-commit": vm.commits[1]})
    assert result.returncode == 0, result.stderr
    src, venv = vm.root / "opt/actfleet/src", vm.root / "opt/actfleet/venv"
    assert git(src, "rev-parse", "HEAD") == vm.commits[1]
    assert (venv / ".actfleet-commit").read_text().split()[0] == vm.commits[1]
    python = f"{vm.root}/opt/actfleet/python/cpython-{PINNED_PYTHON}-linux-x86_64-gnu/bin/python3"
    # uv and the interpreter are already there at their pinned versions: only the venv is rebuilt.
    assert vm.calls()[n:] == [
        "systemctl start --no-block actfleet-bootstrap.service",
        f"uv venv -q --python {python} {venv}",
        f"uv pip sync -q --python {venv}/bin/python --require-hashes {src}/bootstrap/requirements-tpu.txt",
        f"uv pip install -q --python {venv}/bin/python --no-deps --no-build-isolation {src}",
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


def test_reads_the_metadata_server_with_its_header(vm):
    """The VM path: attributes over HTTP from a metadata server that insists on Metadata-Flavor: Google."""
    vm.image_has_pip()

    def lookup(key):
        path = vm.metadata_dir / key
        return path.read_bytes() if path.is_file() else None

    with serve_attributes(lookup) as (url, served):
        result = vm.run({"ACTFLEET_METADATA_DIR": "", "ACTFLEET_METADATA_URL": url})
    assert result.returncode == 0, result.stderr
    assert ("actfleet-commit", 200) in served and ("actfleet-worker", 200) in served
    assert "ACTFLEET_WORKER=tpu-us-central1-a-0" in (vm.root / "etc/actfleet/worker.env").read_text()


def test_missing_metadata_is_named(vm, tmp_path):
    (tmp_path / "metadata" / "actfleet-worker").unlink()
    result = vm.run()
    assert result.returncode == 2
    assert "instance metadata 'actfleet-worker' is missing" in result.stderr


def test_a_commit_not_in_the_repository_fails_and_leaves_no_checkout(vm):
    vm.image_has_pip()
    result = vm.run(**{"actfleet-commit": "f" * 40})
    assert result.returncode == 0, result.stderr  # the guest agent's part; the unit is what fails
    assert f"commit {'f' * 40} is not in" in result.stderr
    assert "attempt 3 failed (exit 1): giving up" in result.stderr  # a push may still be on its way: retried
    assert not (vm.root / "opt/actfleet/src").exists()
    assert vm.calls() == [*BOOT_START, "bootstrap exited 1"]  # nothing installed, nothing started


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

    vm.image_has_pip()
    assert vm.run().returncode == 0
    installed = unit_file(vm.root / "etc/systemd/system/actfleet-worker.service")["Service"]
    assert installed["User"] == ["actfleet"]
    assert (vm.root / "etc/passwd").read_text().splitlines() == [
        "actfleet:x:999:999::/var/lib/actfleet:/usr/sbin/nologin"
    ]
    for path in ("etc/actfleet/fleet.toml", "etc/actfleet/worker.env"):  # readable by the worker, not writable
        assert stat.S_IMODE((vm.root / path).stat().st_mode) == 0o644


def test_the_bootstrap_unit_retries_forever_but_not_bad_input(vm):
    vm.image_has_pip()
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


def test_the_script_is_valid_bash_and_the_metadata_carries_bootstrap_verbatim():
    assert subprocess.run(["bash", "-n", str(STARTUP)]).returncode == 0
    code = [line for line in STARTUP.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\|\s*(ba)?sh\b", line)]  # nothing piped into a shell
    config = parse(
        {
            "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
            "repo": {"url": "https://example.com/r.git", "commit": "a" * 40},
            "storage": {"bucket": "my-project-acts"},
            "job": {"model": "m", "input": "i", "layers": [1]},
        }
    )
    md = worker_metadata(config, config.fleet.workers[0])
    assert md["startup-script"] == STARTUP.read_text() and md["actfleet-unit"] == UNIT.read_text()
