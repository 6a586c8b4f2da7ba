"""The PR plan workflow (.github/workflows/plan.yml) asks for an OIDC token only in the job that uses it, and
installs only what synth and plan need: checked on the YAML and on what `make` would really run for its steps
(`make -n`, in a copy of the Makefile where nothing is installed yet)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "plan.yml"


def load() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_id_token_is_granted_at_job_level_only():
    workflow = load()
    assert "id-token" not in (workflow.get("permissions") or {})  # not every job of the workflow
    for name, job in workflow["jobs"].items():
        uses_oidc = any(s.get("uses", "").startswith("google-github-actions/auth@") for s in job["steps"])
        permissions = job.get("permissions")
        assert isinstance(permissions, dict), f"job {name}: permissions must be explicit"
        assert permissions.get("id-token") == ("write" if uses_oidc else None), name
        assert set(permissions) <= {"contents", "id-token"} and permissions["contents"] == "read", name


def test_installs_only_what_synth_and_plan_need(tmp_path):
    steps = load()["jobs"]["plan"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    assert not re.search(r"pip install|\[test|torch", script)  # installs go through make, checked below
    targets = re.findall(r"\bmake ([a-z-]+)", script)
    assert targets == ["synth"]
    for name in ("Makefile", "pyproject.toml", "package.json", "package-lock.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    dry = subprocess.run(
        ["make", "-n", *targets, "CONFIG=fleet.toml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line]
    assert any("'.[cloud]'" in line for line in installs), dry.stdout  # the cloud pins: cdktf and bindings
    assert not any(re.search(r"test|torch", line) for line in installs), installs
