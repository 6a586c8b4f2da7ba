"""bootstrap/startup.sh run for real in a temporary root.

Stand-ins: a local git repository (`git init` here) for the code, a directory of files for the metadata
server, a recording installer for pip, and a recording systemctl (there is no systemd here). Everything
else - git, the venv module, the script's own logic - is the real thing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from actfleet.config import parse
from actfleet.infra.startup_script import worker_metadata

ROOT = Path(__file__).resolve().parent.parent
STARTUP = ROOT / "bootstrap" / "startup.sh"
UNIT = ROOT / "bootstrap" / "actfleet-worker.service"


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def vm(tmp_path):
    """A fake TPU VM: repository with two commits, metadata directory, recording pip and systemctl."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "bootstrap").mkdir()
    (repo / "bootstrap" / "actfleet-worker.service").write_text(UNIT.read_text())
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
    log = tmp_path / "calls.log"
    pip = executable(tmp_path / "pip", f"""#!/usr/bin/env bash
# Stands in for `pip install <checkout>[tpu]`: records the call, provides the console script.
echo "pip $*" >> {log}
mkdir -p "$VIRTUAL_ENV/bin"
printf '#!/bin/sh\\necho actfleet "$@"\\n' > "$VIRTUAL_ENV/bin/actfleet"
chmod +x "$VIRTUAL_ENV/bin/actfleet"
""")
    active = tmp_path / "unit-active"
    systemctl = executable(tmp_path / "systemctl", f"""#!/usr/bin/env bash
# Stands in for systemctl: records calls; the unit is "active" once restarted or started.
echo "systemctl $*" >> {log}
case "$1" in
  is-active) [ -f {active} ];;
  restart) touch {active};;
  enable) [ "${{2:-}}" = "--now" ] && touch {active}; true;;
esac
""")
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    config = parse({
        "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
        "repo": {"url": str(repo), "commit": first},
        "storage": {"bucket": "my-project-acts"},
        "job": {"name": "resid", "model": "m", "input": "i", "layers": [1]},
    })
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
            env = {**os.environ, "ACTFLEET_ROOT": str(self.root), "ACTFLEET_METADATA_DIR": str(metadata),
                   "ACTFLEET_PIP": str(pip), "ACTFLEET_SYSTEMCTL": str(systemctl),
                   "ACTFLEET_PYTHON": sys.executable, "ACTFLEET_VENV_ARGS": "--without-pip",
                   "GIT_CONFIG_NOSYSTEM": "1", **(env_changes or {})}
            return subprocess.run(["bash", str(STARTUP)], env=env, capture_output=True, text=True, timeout=120)

        def calls(self) -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

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


def test_first_boot_sets_up_and_second_boot_is_a_no_op(vm):
    first = vm.run()
    assert first.returncode == 0, first.stderr
    root = vm.root
    src = root / "opt/actfleet/src"
    assert git(src, "rev-parse", "HEAD") == vm.commits[0]
    assert (root / "opt/actfleet/venv/.actfleet-commit").read_text().strip() == vm.commits[0]
    assert (root / "opt/actfleet/venv/bin/actfleet").exists()
    assert (root / "etc/actfleet/fleet.toml").read_text() == '[fleet]\nid = "acts"\n'
    env = (root / "etc/actfleet/worker.env").read_text()
    assert "ACTFLEET_WORKER=tpu-us-central1-a-0\n" in env  # the worker id reaches `actfleet work`
    assert f"ACTFLEET_CONFIG={root}/etc/actfleet/fleet.toml\n" in env
    unit = (root / "etc/systemd/system/actfleet-worker.service").read_text()
    assert "@ROOT@" not in unit
    assert f"ExecStart={root}/opt/actfleet/venv/bin/actfleet work --config ${{ACTFLEET_CONFIG}} " \
           f"--worker-id ${{ACTFLEET_WORKER}}" in unit
    assert "Restart=on-failure" in unit and "StandardOutput=journal" in unit
    assert vm.calls() == [f"pip install -q {src}[tpu]", "systemctl daemon-reload",
                          "systemctl enable actfleet-worker.service", "systemctl restart actfleet-worker.service"]

    before = snapshot(root)
    second = vm.run()
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert snapshot(root) == before  # no file rewritten, no reinstall
    assert vm.calls()[4:] == ["systemctl is-active --quiet actfleet-worker.service"]  # and no restart


def test_a_stopped_unit_is_started_without_reinstalling(vm):
    assert vm.run().returncode == 0
    vm.stop_unit()
    result = vm.run()
    assert result.returncode == 0, result.stderr
    assert vm.calls()[4:] == ["systemctl is-active --quiet actfleet-worker.service",
                              "systemctl enable --now actfleet-worker.service"]


def test_a_new_pinned_commit_is_checked_out_installed_and_restarted(vm):
    assert vm.run().returncode == 0
    result = vm.run(**{"actfleet-commit": vm.commits[1]})
    assert result.returncode == 0, result.stderr
    src = vm.root / "opt/actfleet/src"
    assert git(src, "rev-parse", "HEAD") == vm.commits[1]
    assert (vm.root / "opt/actfleet/venv/.actfleet-commit").read_text().strip() == vm.commits[1]
    assert vm.calls()[4:] == [f"pip install -q {src}[tpu]", "systemctl enable actfleet-worker.service",
                              "systemctl restart actfleet-worker.service"]


@pytest.mark.parametrize("ref", ["main", "v1", "HEAD", "0123456", "0123456789ABCDEF0123456789ABCDEF01234567"])
def test_a_moving_or_ambiguous_ref_is_refused(vm, ref):
    result = vm.run(**{"actfleet-commit": ref})
    assert result.returncode == 2
    assert f"actfleet-commit = '{ref}'" in result.stderr and "refusing a moving ref" in result.stderr
    assert not (vm.root / "opt").exists() and vm.calls() == []


def test_reads_the_metadata_server_with_its_header(vm):
    """The VM path: attributes over HTTP from a metadata server that insists on Metadata-Flavor: Google."""
    served = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.rsplit("/", 1)[-1]
            path = vm.metadata_dir / key
            if self.headers.get("Metadata-Flavor") != "Google":
                status, body = 403, b"missing Metadata-Flavor header"
            elif not path.is_file():
                status, body = 404, b"not found"
            else:
                status, body = 200, path.read_bytes()
            served.append((key, status))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/attributes"
        result = vm.run({"ACTFLEET_METADATA_DIR": "", "ACTFLEET_METADATA_URL": url})
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert ("actfleet-commit", 200) in served and ("actfleet-worker", 200) in served
    assert "ACTFLEET_WORKER=tpu-us-central1-a-0" in (vm.root / "etc/actfleet/worker.env").read_text()


def test_missing_metadata_is_named(vm, tmp_path):
    (tmp_path / "metadata" / "actfleet-worker").unlink()
    result = vm.run()
    assert result.returncode == 2
    assert "instance metadata 'actfleet-worker' is missing" in result.stderr


def test_a_commit_not_in_the_repository_fails_and_leaves_no_checkout(vm):
    result = vm.run(**{"actfleet-commit": "f" * 40})
    assert result.returncode != 0
    assert not (vm.root / "opt/actfleet/src").exists()
    assert vm.calls() == []


def test_the_script_is_valid_bash_and_the_metadata_carries_bootstrap_verbatim():
    assert subprocess.run(["bash", "-n", str(STARTUP)]).returncode == 0
    config = parse({
        "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
        "repo": {"url": "https://example.com/r.git", "commit": "a" * 40},
        "storage": {"bucket": "my-project-acts"}, "job": {"model": "m", "input": "i", "layers": [1]},
    })
    md = worker_metadata(config, config.fleet.workers[0])
    assert md["startup-script"] == STARTUP.read_text() and md["actfleet-unit"] == UNIT.read_text()
