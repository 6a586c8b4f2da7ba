"""`actfleet synth | plan | deploy | destroy` as a user runs them: the console script in a subprocess, the
real terraform binary, the fleet stack's provisioners talking to the fake TPU API on loopback.

Every test shares one synth cache, so cdktf is imported once for the module (the first `synth`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_fleet_toml
from tests.fakes.gcs_server import FakeGcs
from tests.fakes.google_apis import FakeGoogleApis
from tests.fakes.tpu_server import FakeTpuServer

ACTFLEET = str(Path(sys.executable).parent / "actfleet")
ZONES = ("us-central1-a", "us-central1-b")


def write_config(path: Path, *, mode: str = "queued", state: Path) -> Path:
    return write_fleet_toml(
        path,
        id="cli",
        zones={z: 2 for z in ZONES},
        state=state,
        fleet={"mode": mode},
        commit="89abcdef0123456789abcdef0123456789abcdef",
        job={"layers": [3]},
    )


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """run(*args) -> CompletedProcess of `actfleet *args` against a module-wide fake TPU API and config."""
    tmp = tmp_path_factory.mktemp("stack-cli")
    gcs = FakeGcs.start()
    # deploy's preflight reads these: a project ready for 2 x v5litepod-8 in each zone.
    apis = FakeGoogleApis.start()
    zones = {z: 16 for z in ZONES}
    apis.ready("fake-project", "default", zones, "TPUV5sPreemptibleLitepodPerProjectPerZoneForTPUAPI",
               "actfleet-cli@fake-project.iam.gserviceaccount.com")  # fmt: skip
    with FakeTpuServer.start(port=0) as fake:
        env = {**os.environ, "ACTFLEET_TPU_ENDPOINT": fake.url, "ACTFLEET_SYNTH_DIR": str(tmp / "synth")}
        env |= {"STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_CLOUD_PROJECT": "actfleet-test"}
        env |= {"ACTFLEET_GOOGLE_API_ENDPOINT": apis.url}
        config = write_config(tmp / "fleet.toml", state=tmp / "state")
        # The commit's release is already in the bucket (tests/test_release.py builds one): deploy finds it there.
        release = "actfleet/releases/89abcdef0123456789abcdef0123456789abcdef/SHA256SUMS"
        gcs.write("fake-project-cli", release, b"", "text/plain", {})

        def run(
            *args: str, env_extra: dict | None = None, config_path: Path | None = config, timeout: float = 600
        ) -> subprocess.CompletedProcess:
            argv = [ACTFLEET, *args] + (["--config", str(config_path)] if config_path else [])
            return subprocess.run(
                argv,
                env={**env, **(env_extra or {})},
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                cwd=tmp,
            )

        run.fake, run.tmp, run.config, run.env, run.gcs, run.apis = fake, tmp, config, env, gcs, apis
        yield run
    gcs.stop()
    apis.stop()


def creates(fake) -> list[str]:
    return [
        c.query.split("queuedResourceId=")[1].split("&")[0]
        for c in fake.calls(method="POST", path=r"/queuedResources$", status=200)
    ]


def deletes(fake) -> list[str]:
    return [c.resource for c in fake.calls(method="DELETE", path=r"/queuedResources/", status=200)]


@pytest.mark.slow
def test_synth_then_cached_synth(cli):
    first = cli("synth", "--json")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["workers"] == 4 and out["mode"] == "queued"
    fleet = json.loads(Path(out["stacks"]["fleet"], "cdk.tf.json").read_text())
    assert set(fleet["resource"]["terraform_data"]["workers"]) >= {"for_each", "input", "provisioner"}

    again = json.loads(cli("synth", "--json").stdout)
    assert again["cached"] is True and again["key"] == out["key"] and again["stacks"] == out["stacks"]

    human = cli("synth", "--stack", "fleet")
    assert human.returncode == 0 and "from the cache" in human.stdout and "base" not in human.stdout


@pytest.mark.slow
def test_plan_deploy_plan_destroy_the_fleet(cli):
    fake = cli.fake
    planned = cli("plan", "--stack", "fleet", "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["stacks"]["fleet"] == {
        "changes": True,
        "add": 4,
        "change": 0,
        "destroy": 0,
        "replace": [],
    }

    human_plan = cli("plan", "--stack", "fleet")
    assert 'terraform_data.workers["tpu-us-central1-b-1"] will be created' in human_plan.stdout
    assert creates(fake) == []  # planning calls no mutating API

    deployed = cli("deploy", "--stack", "fleet", "--yes")
    assert deployed.returncode == 0, deployed.stderr
    assert sorted(creates(fake)) == [
        "tpu-us-central1-a-0",
        "tpu-us-central1-a-1",
        "tpu-us-central1-b-0",
        "tpu-us-central1-b-1",
    ]
    assert "fleet stack: deploy done (4 added, 0 changed, 0 destroyed)" in deployed.stdout
    assert "release 89abcdef0123: already published at gs://fake-project-cli/actfleet/releases/" in deployed.stdout

    again = cli("deploy", "--stack", "fleet", "--yes", "--json")
    assert json.loads(again.stdout)["stacks"]["fleet"]["applied"] is False
    assert len(creates(fake)) == 4

    destroyed = cli("destroy", "--yes", "--json")  # default stack: the fleet only
    assert destroyed.returncode == 0, destroyed.stderr
    assert json.loads(destroyed.stdout)["stacks"] == {
        "fleet": {"changes": True, "add": 0, "change": 0, "destroy": 4, "replace": [], "applied": True}
    }
    assert sorted(deletes(fake)) == sorted(creates(fake))
    fake.clear_calls()
    # Each plan was saved to a file of its own and removed once applied or shown.
    stack_dir = Path(json.loads(cli("synth", "--json").stdout)["stacks"]["fleet"])
    assert list(stack_dir.glob("*.tfplan")) == []


@pytest.mark.slow
def test_api_error_fails_deploy_with_one_line_and_exit_1(cli):
    fake = cli.fake
    fake.fail(zone="us-central1-a", status=403, count=None, method="POST")
    try:
        result = cli("deploy", "--stack", "fleet", "--yes")
    finally:
        fake.clear_faults()
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("actfleet: terraform apply failed in fleet stack: Error: local-exec provisioner error")
    assert "403" in last and "tpu-us-central1-a-" in last
    # The other zone's workers exist; a repeat deploy finishes the job once the API allows it.
    assert cli("deploy", "--stack", "fleet", "--yes").returncode == 0
    assert {c.zone for c in fake.calls(method="POST", status=200)} == set(ZONES)
    assert cli("destroy", "--stack", "fleet", "--yes").returncode == 0


@pytest.mark.slow
def test_deploy_without_yes_and_without_a_terminal_applies_nothing(cli):
    cli.fake.clear_calls()
    result = cli("deploy", "--stack", "fleet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "actfleet: deploy of the fleet stack needs a confirmation: run it in a terminal or pass --yes"
    )
    assert creates(cli.fake) == []


@pytest.mark.slow
def test_deploy_stops_at_a_failed_preflight_and_applies_nothing(cli):
    cli.apis.enabled.discard("tpu.googleapis.com")
    try:
        result = cli("deploy", "--stack", "fleet", "--yes")
    finally:
        cli.apis.enabled.add("tpu.googleapis.com")
    assert result.returncode == 1
    assert "FAIL  api tpu" in result.stderr and "fix: gcloud services enable tpu.googleapis.com" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("actfleet: preflight: 1 check(s) failed (api tpu)")
    assert creates(cli.fake) == [] and result.stdout == ""


@pytest.mark.slow
def test_deploy_without_a_release_publishes_one_first_and_applies_no_fleet_without_it(cli):
    """The fleet's VMs install from the release: with none in the bucket deploy must publish it first, and
    here (no git checkout holding the commit) it cannot: exit 2 naming what to do, no worker created."""
    key = ("fake-project-cli", "actfleet/releases/89abcdef0123456789abcdef0123456789abcdef/SHA256SUMS")
    published = cli.gcs.objects.pop(key)
    try:
        result = cli("deploy", "--stack", "fleet", "--yes")
    finally:
        cli.gcs.objects[key] = published
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "actfleet: not inside a git checkout of the project: pass --repo PATH (a clone holding repo.commit)"
    )
    assert creates(cli.fake) == [] or "tpu-" not in result.stdout


@pytest.mark.slow
def test_deploy_asks_on_a_terminal_and_no_applies_nothing(cli):
    import pty

    cli.fake.clear_calls()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [ACTFLEET, "deploy", "--stack", "fleet", "--config", str(cli.config)],
        env=cli.env,
        cwd=cli.tmp,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    try:
        os.write(master, b"n\n")  # typed ahead: the terminal holds it until the prompt reads
        out, err = proc.communicate(timeout=600)
    finally:
        os.close(master)
    assert proc.returncode == 1
    assert "deploy the fleet stack: 4 to add, 0 to change, 0 to destroy? [y/N]" in err
    # (the answer's newline echoes on the terminal, not on stderr: the message follows the prompt)
    assert err.rstrip().endswith("? [y/N]: actfleet: deploy of the fleet stack declined: nothing applied")
    assert 'terraform_data.workers["tpu-us-central1-a-0"] will be created' in out  # the plan it asked about
    assert creates(cli.fake) == []


def test_bad_config_is_one_line_exit_2(cli, tmp_path):
    bad = tmp_path / "fleet.toml"
    bad.write_text(cli.config.read_text().replace('mode = "queued"', 'mode = "spot"'))
    for command in ("synth", "plan", "deploy", "destroy"):
        result = cli(command, config_path=bad)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip() == f'actfleet: {bad}: fleet.mode = "spot": must be one of "queued", "vm", "gce"'


def test_unknown_stack_is_a_usage_error(cli):
    result = cli("plan", "--stack", "data")
    assert result.returncode == 2 and "'data' is not one of 'base', 'fleet'" in result.stderr


def test_missing_terraform_is_exit_3(cli):
    result = cli("plan", "--stack", "fleet", env_extra={"PATH": "/nonexistent", "ACTFLEET_TERRAFORM": "terraform"})
    assert result.returncode == 3
    assert result.stderr.strip().startswith("actfleet: terraform not found on PATH: install Terraform >= 1.5")


# ----------------------------------------------------------------------------------------------------
# The pull-request plan workflow
# ----------------------------------------------------------------------------------------------------

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "plan.yml"


def test_plan_workflow_is_a_valid_github_workflow():
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_plan_workflow_plans_both_stacks_with_federated_identity_and_pinned_actions():
    import yaml

    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on:` as true
    assert set(triggers) == {"pull_request"}
    assert workflow["permissions"] == {}  # id-token only where it is used: tests/test_workflows.py
    steps = workflow["jobs"]["plan"]["steps"]
    uses = [s["uses"] for s in steps if "uses" in s]
    for ref in uses:  # every action pinned to a full commit, never a moving tag
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), ref
    auth = next(s for s in steps if s.get("uses", "").startswith("google-github-actions/auth@"))
    assert set(auth["with"]) == {"workload_identity_provider", "service_account"}
    text = WORKFLOW.read_text()
    assert "credentials_json" not in text and "GOOGLE_CREDENTIALS" not in text  # never a key
    script = "\n".join(s.get("run", "") for s in steps)
    assert "make synth" in script and "for stack in base fleet" in script and "plan --stack" in script
    assert "$GITHUB_STEP_SUMMARY" in script
