"""The queued-mode fleet stack, for real: the terraform binary, `terraform init` offline (no provider),
create- and destroy-time provisioners running `actfleet tpu create-qr/delete-qr` against the fake TPU API.

One synth + init per module (importing cdktf costs ~20 s); the lifecycle test walks apply -> no-op apply
-> replace one -> destroy on the same state, checking the fake's call log at each step.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from actfleet import config as config_mod
from actfleet.infra.qr_request import queued_resource_request
from actfleet.infra.terraform import Terraform, TerraformError, error_summary, fleet_stack
from actfleet.infra.terraform_layout import worker_address
from tests.conftest import write_fleet_toml
from tests.fakes.tpu_server import FakeTpuServer

pytestmark = pytest.mark.slow

ZONES = ("us-central1-a", "us-central1-b", "us-central1-c")
WORKERS_PER_ZONE = 4


def state_list(tf: Terraform) -> list[str]:
    """Addresses in the stack's state; empty before the first apply."""
    try:
        out = tf.run("state", "list", stream=False)
    except TerraformError as e:
        if "No state file was found" in e.output:
            return []
        raise
    return [line for line in out.splitlines() if line.strip()]


def show_json(tf: Terraform) -> dict:
    """The stack's state as `terraform show -json` (values of every resource, e.g. a worker's input)."""
    return json.loads(tf.run("show", "-json", stream=False))


def write_config(dir: Path, *, workers_per_zone: int = WORKERS_PER_ZONE, fleet: dict | None = None) -> Path:
    return write_fleet_toml(
        dir / "fleet.toml", zones={z: workers_per_zone for z in ZONES}, state=dir / "state", fleet=fleet
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fake TPU API, a config pointing at it, and a private synth cache; environment restored after."""
    tmp = tmp_path_factory.mktemp("fleet-tf")
    saved = {k: os.environ.get(k) for k in ("ACTFLEET_TPU_ENDPOINT", "ACTFLEET_SYNTH_DIR")}
    with FakeTpuServer.start(port=0) as fake:
        os.environ["ACTFLEET_TPU_ENDPOINT"] = fake.url
        os.environ["ACTFLEET_SYNTH_DIR"] = str(tmp / "synth")
        try:
            cfg = config_mod.load(write_config(tmp))
            yield cfg, fake, tmp
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def qr_creates(fake, qr_id=None):
    calls = fake.calls(method="POST", path=r"/queuedResources$")
    return [c for c in calls if c.status == 200 and (qr_id is None or f"queuedResourceId={qr_id}" in c.query)]


def qr_deletes(fake, qr_id=None):
    return [
        c
        for c in fake.calls(method="DELETE", path=r"/queuedResources/")
        if c.status == 200 and (qr_id is None or c.resource == qr_id)
    ]


def test_fleet_lifecycle_against_fake_tpu_api(env):
    cfg, fake, _ = env
    names = [w.name for w in cfg.fleet.workers]
    assert len(names) == 12

    # init works offline: the stack needs no provider plugin.
    tf = fleet_stack(cfg)
    assert not (tf.dir / ".terraform" / "providers").exists()
    assert state_list(tf) == []  # no state file yet: nothing, not an error

    # The plan creates one resource per worker, each addressable on its own.
    plan = tf.plan()
    assert (plan.add, plan.change, plan.destroy) == (12, 0, 0)
    assert 'terraform_data.workers["tpu-us-central1-a-3"]' in plan.text
    assert "spot = {}" in plan.text and "startup-script" in plan.text

    # apply: every worker's queued resource is created through `actfleet tpu create-qr`.
    tf.apply()
    assert sorted(state_list(tf)) == sorted(worker_address(n) for n in names)
    created = qr_creates(fake)
    assert len(created) == 12
    assert {fake.queued_resource_state(w.zone, w.name, project="fake-project") for w in cfg.fleet.workers} == {"ACTIVE"}

    # What Terraform holds as each worker's input is exactly the request actfleet builds: nothing lost to
    # template escaping (the startup script is full of ${...}).
    state = show_json(tf)
    inputs = {r["index"]: r["values"]["input"] for r in state["values"]["root_module"]["resources"]}
    for w in cfg.fleet.workers:
        assert inputs[w.name]["request"] == queued_resource_request(cfg, w)
        assert (inputs[w.name]["project"], inputs[w.name]["zone"], inputs[w.name]["id"]) == (
            "fake-project",
            w.zone,
            w.name,
        )

    # A second plain apply changes nothing and calls no mutating API.
    fake.clear_calls()
    assert not tf.plan().changes
    tf.apply()
    assert qr_creates(fake) == [] and qr_deletes(fake) == []

    # -replace of one worker recreates exactly that one: one delete and one create, both for it.
    target = "tpu-us-central1-b-2"
    plan = tf.plan(replace=[worker_address(target)])
    assert (plan.add, plan.change, plan.destroy) == (1, 0, 1)
    assert plan.replace == (worker_address(target),)
    tf.apply(replace=[worker_address(target)])
    assert [c.resource for c in qr_deletes(fake)] == [target]
    assert len(qr_creates(fake)) == 1 and len(qr_creates(fake, target)) == 1

    # A queued resource deleted behind Terraform's back is recreated by a replace (create-qr is
    # idempotent, delete-qr tolerates "already gone").
    fake.delete_direct("us-central1-c", "tpu-us-central1-c-0")
    fake.clear_calls()
    tf.apply(replace=[worker_address("tpu-us-central1-c-0")])
    assert len(qr_creates(fake, "tpu-us-central1-c-0")) == 1

    # destroy: every queued resource is deleted through `actfleet tpu delete-qr`.
    fake.clear_calls()
    tf.destroy()
    assert sorted(c.resource for c in qr_deletes(fake)) == sorted(names)
    assert state_list(tf) == []
    for w in cfg.fleet.workers:
        assert fake.queued_resource_state(w.zone, w.name, project="fake-project") is None


def test_failing_provisioner_is_one_terraform_error_naming_the_worker(env, tmp_path):
    """The TPU API refusing a create fails the apply with Terraform's summary, which carries actfleet's
    one-line API error; the worker is left tainted, so the next apply retries it."""
    cfg, fake, _ = env
    one = config_mod.load(write_config(tmp_path, workers_per_zone=1))
    tf = fleet_stack(one)
    fake.fail(zone="us-central1-b", status=403, count=None, method="POST")
    try:
        with pytest.raises(TerraformError) as e:
            tf.apply()
    finally:
        fake.clear_faults()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("terraform apply failed in fleet stack: Error: local-exec provisioner error")
    assert 'terraform_data.workers["tpu-us-central1-b-0"]' in message
    assert "403" in message and e.value.exit_code == 1
    # The two other workers were created; the failed one is retried by the next apply.
    assert fake.queued_resource_state("us-central1-a", "tpu-us-central1-a-0", project="fake-project") == "ACTIVE"
    tf.apply()
    assert fake.queued_resource_state("us-central1-b", "tpu-us-central1-b-0", project="fake-project") == "ACTIVE"
    tf.destroy()


def test_error_summary_reads_terraform_diagnostics():
    plain = textwrap.dedent("""\
        terraform_data.workers["w"]: Creating...

        Error: local-exec provisioner error

          with terraform_data.workers["w"],
          on cdk.tf.json line 40, in resource.terraform_data.workers:
          40:         "provisioner": [

        Error running command 'x': exit status 1. Output: actfleet: TPU API: 403
        denied

        Warning: something harmless
        """)
    boxed = "\n".join(("╷" if not line else "│ " + line) for line in plain.splitlines()[2:]) + "\n╵\n"
    expected = (
        'Error: local-exec provisioner error (terraform_data.workers["w"]): '
        "Error running command 'x': exit status 1. Output: actfleet: TPU API: 403 denied"
    )
    assert error_summary(plain) == expected
    assert error_summary(boxed) == expected
    assert error_summary("plain failure\nlast words\n") == "plain failure last words"


def test_terraform_refuses_a_directory_without_a_stack(tmp_path):
    with pytest.raises(Exception, match="no cdk.tf.json"):
        Terraform(tmp_path)


def test_a_second_concurrent_apply_fails_fast_on_the_state_lock(env, tmp_path):
    """Terraform's state lock is the floor under reconcile's own lock: while one apply runs, another on
    the same state fails at once with Terraform's lock error (lock_timeout 0s), changing nothing."""
    import threading
    import time

    cfg, fake, _ = env
    one = config_mod.load(write_config(tmp_path, workers_per_zone=1))
    first, second = fleet_stack(one), fleet_stack(one)
    lock_info = tmp_path / "state" / ".fleet.tfstate.lock.info"
    fake.fail(status=None, delay=3.0, count=1, method="POST")  # one slow create keeps the first apply busy
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("out", first.apply()))
    runner.start()
    try:
        while not lock_info.exists() and runner.is_alive():
            time.sleep(0.05)
        assert lock_info.exists(), "the first apply never took the state lock"
        with pytest.raises(TerraformError, match="Error acquiring the state lock"):
            second.apply()
    finally:
        runner.join()
        fake.clear_faults()
    assert "out" in outcome  # the first apply finished normally
    assert len(state_list(first)) == 3
    first.destroy()
