"""The base and fleet stacks, asserted on their synthesized Terraform JSON (cdktf Testing + plain JSON).

One 3-zone x 4-worker config, synthesized once per mode for the whole module (importing the jsii
bindings costs ~20 s). The real terraform lifecycle of the fleet stack is in test_fleet_terraform.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actfleet.config import parse
from actfleet.infra import synth_cache
from actfleet.infra.qr_request import queued_resource_request
from actfleet.infra.release_id import release_id
from actfleet.infra.startup_script import config_url, startup_script, worker_unit
from tests.conftest import write_fleet_toml

ROOT = Path(__file__).resolve().parent.parent
ACTFLEET = "/opt/actfleet-test/bin/actfleet"
CONFIG_TEXT = '# the operator\'s fleet.toml, uploaded for the workers\n[fleet]\nid = "acts"\n'


# gce mode needs a boot image and a TPU type Compute Engine has machine types for (actfleet/accelerators.py).
GCE = {"boot_image": "projects/example-images/global/images/family/example-tpu-vm", "accelerator_type": "v6e-4"}


def make_config(mode="queued", **fleet):
    raw = {
        "fleet": {
            "id": "acts",
            "project": "my-project",
            "region": "us-central1",
            "mode": mode,
            "zones": {"us-central1-a": 4, "us-central1-b": 4, "us-central1-c": 4},
            **fleet,
        },
        "repo": {"url": "https://github.com/example/actfleet.git", "commit": "0123456789abcdef" * 2 + "01234567"},
        "storage": {"bucket": "my-project-acts", "soft_delete_days": 7},
        "job": {"name": "resid", "model": "Qwen/Qwen2.5-0.5B", "input": "gs://my-project-acts/d.jsonl", "layers": [6]},
    }
    return parse(raw, source="test.toml")


def synth_app(config, outdir: Path, state_dir: Path) -> dict[str, dict]:
    from actfleet.infra.stacks import build_app

    build_app(config, outdir, state_dir=state_dir, config_text=CONFIG_TEXT, actfleet=ACTFLEET).synth()
    return {name: json.loads((outdir / "stacks" / name / "cdk.tf.json").read_text()) for name in ("base", "fleet")}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    out = {}
    for mode in ("queued", "vm", "gce"):
        d = tmp_path_factory.mktemp(mode)
        out[mode] = synth_app(make_config(mode, **GCE if mode == "gce" else {}), d / "out", d / "state")
        out[mode]["state_dir"] = d / "state"
        out[mode]["outdir"] = d / "out"
    d = tmp_path_factory.mktemp("gcs")
    out["gcs"] = synth_app(parse(_raw_with_state(), source="gcs.toml"), d / "out", d / "state")
    return out


def _raw_with_state():
    cfg = make_config()
    return {
        "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
        "repo": {"url": cfg.repo.url, "commit": cfg.repo.commit},
        "storage": {"bucket": "my-project-acts"},
        "state": {"backend": "gcs", "bucket": "my-project-tfstate", "prefix": "teams/acts"},
        "job": {"model": "m", "input": "i", "layers": [1]},
    }


def resources(stack: dict, rtype: str) -> dict:
    return stack.get("resource", {}).get(rtype, {})


def decoded(expression: str) -> str:
    """The text behind a `${base64decode("...")}` expression."""
    m = re.fullmatch(r'\$\{base64decode\("([A-Za-z0-9+/=]*)"\)\}', expression)
    assert m, expression[:80]
    return base64.b64decode(m[1]).decode()


def cdktf_testing():
    from cdktf import Testing

    return Testing


# ---------------------------------------------------------------------------------------------------
# base
# ---------------------------------------------------------------------------------------------------


def test_base_bucket_is_hardened(stacks):
    base = json.dumps(stacks["queued"]["base"])
    assert cdktf_testing().to_have_resource_with_properties(
        base,
        "google_storage_bucket",
        {
            "name": "my-project-acts",
            "location": "US-CENTRAL1",
            "uniform_bucket_level_access": True,
            "public_access_prevention": "enforced",
            "versioning": {"enabled": False},
            "soft_delete_policy": {"retention_duration_seconds": 7 * 86400},
            "force_destroy": False,
            "labels": {"actfleet-fleet": "acts", "managed-by": "actfleet"},
        },
    )
    assert not cdktf_testing().to_have_resource_with_properties(
        base, "google_storage_bucket", {"public_access_prevention": "inherited"}
    )


def test_base_iam_is_bucket_scoped_and_keyless(stacks):
    base = stacks["queued"]["base"]
    # Exactly these resource types: nothing project-wide beyond the two writer roles, and no keys.
    assert set(base["resource"]) == {
        "google_storage_bucket",
        "google_service_account",
        "google_storage_bucket_iam_member",
        "google_project_iam_member",
        "google_storage_bucket_object",
    }
    (account,) = resources(base, "google_service_account").values()
    assert account["account_id"] == "actfleet-acts"
    # On the bucket: conditional grants only (tests/test_bucket_access.py evaluates them with a CEL engine).
    members = resources(base, "google_storage_bucket_iam_member")
    objects = "projects/_/buckets/my-project-acts/objects/"
    assert {name: (m["role"], m["condition"]["expression"]) for name, m in members.items()} == {
        "worker-list": ("roles/storage.objectViewer", 'resource.type == "storage.googleapis.com/Bucket"'),
        "worker-read": (
            "roles/storage.objectViewer",
            f'resource.name == "{objects}actfleet/acts/fleet.toml" || resource.name == "{objects}d.jsonl" || '
            f'resource.name.startsWith("{objects}actfleet/releases/{make_config().repo.commit}/") || '
            f'resource.name.startsWith("{objects}models/Qwen--Qwen2.5-0.5B/")',
        ),
        "worker-write": ("roles/storage.objectUser", f'resource.name.startsWith("{objects}resid/")'),
    }
    assert "roles/storage.objectAdmin" not in json.dumps(base)  # no grant that could rewrite fleet.toml
    for m in members.values():
        assert m["bucket"] == "${google_storage_bucket.activations.name}"
        assert m["member"] == "serviceAccount:${google_service_account.worker.email}"
        assert m["condition"]["title"]
    project_members = resources(base, "google_project_iam_member").values()
    assert sorted(m["role"] for m in project_members) == ["roles/logging.logWriter", "roles/monitoring.metricWriter"]
    assert {m["member"] for m in project_members} == {"serviceAccount:${google_service_account.worker.email}"}
    assert "credentials" not in json.dumps(base["provider"])


def test_base_uploads_the_config_the_workers_read(stacks):
    base = stacks["queued"]["base"]
    (obj,) = resources(base, "google_storage_bucket_object").values()
    assert obj["name"] == "actfleet/acts/fleet.toml"
    assert decoded(obj["content"]) == CONFIG_TEXT
    assert config_url(make_config()) == "gs://my-project-acts/actfleet/acts/fleet.toml"


def test_backends_local_by_default_gcs_when_configured(stacks):
    state_dir = stacks["queued"]["state_dir"]
    for name in ("base", "fleet"):
        assert stacks["queued"][name]["terraform"]["backend"] == {"local": {"path": str(state_dir / f"{name}.tfstate")}}
        assert stacks["gcs"][name]["terraform"]["backend"] == {
            "gcs": {"bucket": "my-project-tfstate", "prefix": f"teams/acts/{name}"}
        }


# ---------------------------------------------------------------------------------------------------
# fleet, queued mode
# ---------------------------------------------------------------------------------------------------


def resolved_requests(fleet: dict) -> dict[str, dict]:
    """local.worker_requests with the shared script/unit references resolved, as Terraform evaluates them."""
    script, unit = decoded(fleet["locals"]["startup_script"]), decoded(fleet["locals"]["worker_unit"])
    text = json.dumps(fleet["locals"]["worker_requests"])
    text = text.replace('"${local.startup_script}"', json.dumps(script)).replace(
        '"${local.worker_unit}"', json.dumps(unit)
    )
    return json.loads(text)


def test_queued_fleet_is_one_for_each_block_with_worker_names(stacks):
    fleet = stacks["queued"]["fleet"]
    assert list(fleet["resource"]) == ["terraform_data"]
    assert list(fleet["resource"]["terraform_data"]) == ["workers"]  # address terraform_data.workers["..."]
    workers = fleet["resource"]["terraform_data"]["workers"]
    assert workers["for_each"] == "${local.worker_requests}"
    assert workers["input"] == "${each.value}"
    # Replaced when its release changes, unless reconcile holds it (var.holds: rolling waves).
    from actfleet.infra.release_id import release_id

    release = release_id(make_config())
    assert workers["triggers_replace"] == '${try(var.holds[each.key], {release = "' + release + '"})}'
    assert fleet["variable"]["holds"]["type"] == "any" and fleet["variable"]["holds"]["default"] == {}
    names = sorted(fleet["locals"]["worker_requests"])
    assert names == [f"tpu-us-central1-{z}-{i}" for z in "abc" for i in range(4)]
    assert "provider" not in fleet and "required_providers" not in fleet["terraform"]  # offline init


def test_queued_requests_are_complete_tpu_api_bodies(stacks):
    config = make_config()
    requests = resolved_requests(stacks["queued"]["fleet"])
    for worker in config.fleet.workers:
        entry = requests[worker.name]
        assert (entry["project"], entry["zone"], entry["id"]) == ("my-project", worker.zone, worker.name)
        # Exactly what `actfleet tpu create-qr` would be given for this worker, script and unit included.
        assert entry["request"] == queued_resource_request(config, worker)
        node_spec = entry["request"]["tpu"]["nodeSpec"][0]
        node = node_spec["node"]
        assert entry["request"]["spot"] == {}
        assert node_spec["parent"] == f"projects/my-project/locations/{worker.zone}"
        assert node_spec["nodeId"] == worker.name
        assert node["acceleratorType"] == "v5litepod-8" and node["runtimeVersion"] == "v2-alpha-tpuv5-lite"
        # No external IP by default: the VM installs from the bucket over Private Google Access (issue 24.1).
        assert node["networkConfig"] == {"network": "default", "enableExternalIps": False}
        assert node["serviceAccount"] == {
            "email": "actfleet-acts@my-project.iam.gserviceaccount.com",
            "scope": ["https://www.googleapis.com/auth/cloud-platform"],
        }
        assert node["labels"] == {
            "actfleet-fleet": "acts",
            "managed-by": "actfleet",
            "actfleet-worker": worker.name,
            "actfleet-release": release_id(config),  # which release it runs: reconcile rolls by it
        }
        md = node["metadata"]
        assert md["startup-script"] == startup_script() == (ROOT / "bootstrap/startup.sh").read_text()
        assert md["actfleet-unit"] == worker_unit()
        assert md["actfleet-worker"] == worker.name
        assert md["actfleet-commit"] == config.repo.commit
        assert md["actfleet-config"] == "gs://my-project-acts/actfleet/acts/fleet.toml"
        assert md["actfleet-release"] == f"gs://my-project-acts/actfleet/releases/{config.repo.commit}/"
        assert "actfleet-repo-url" not in md  # a VM never fetches the repository
        assert md["actfleet-job"] == "resid"


def test_queued_synth_carries_the_script_once_not_per_worker(stacks):
    text = json.dumps(stacks["queued"]["fleet"])
    script_b64 = base64.b64encode(startup_script().encode()).decode()
    assert text.count(script_b64) == 1
    per_worker = len(json.dumps(stacks["queued"]["fleet"]["locals"]["worker_requests"])) / 12
    assert per_worker < len(startup_script()) / 2  # references, not copies


def test_queued_provisioners_call_actfleet_tpu_and_destroy_uses_only_self(stacks):
    workers = stacks["queued"]["fleet"]["resource"]["terraform_data"]["workers"]
    create, destroy = (p["local-exec"] for p in workers["provisioner"])
    assert "when" not in create and destroy["when"] == "destroy"
    where = "--project ${self.input.project} --zone ${self.input.zone} --id ${self.input.id}"
    assert create["command"] == f"{ACTFLEET} tpu create-qr {where}"
    # --no-wait: the apply asks for the delete and goes on; the next reconcile pass confirms it.
    assert destroy["command"] == f"{ACTFLEET} tpu delete-qr {where} --no-wait"
    assert create["environment"] == {
        "ACTFLEET_TPU_ENDPOINT": "${self.input.endpoint}",
        "ACTFLEET_TPU_REQUEST": "${jsonencode(self.input.request)}",
    }
    # Destroy-time provisioners may only refer to self (Terraform rejects anything else).
    refs = re.findall(r"\$\{([^}]*)\}", json.dumps(destroy))
    assert refs and all(r.startswith("self.") for r in refs)
    # The actfleet binary is in the provisioner, not in input: moving the checkout replaces nothing.
    assert ACTFLEET not in json.dumps(stacks["queued"]["fleet"]["locals"])


def test_queued_endpoint_comes_from_config_then_environment(monkeypatch):
    config = make_config(tpu_endpoint="http://127.0.0.1:1")
    assert config.fleet.endpoint() == "http://127.0.0.1:1"
    key = synth_cache.cache_key(config)
    monkeypatch.setenv("ACTFLEET_TPU_ENDPOINT", "http://127.0.0.1:2")
    assert config.fleet.endpoint() == "http://127.0.0.1:2"
    assert synth_cache.cache_key(config) != key  # the baked endpoint is part of the key


def test_a_release_is_one_per_config_and_changes_with_the_request():
    from actfleet.infra.release_id import release_id

    config = make_config()
    assert release_id(config) == release_id(make_config())  # stable
    assert release_id(config).startswith("r") and len(release_id(config)) == 13
    # Every worker of the config shares it (name and zone are placeholders in the hash).
    assert release_id(config.replace("fleet", workers=config.fleet.workers[5:])) == release_id(config)
    assert release_id(make_config(runtime_version="v2-other")) != release_id(config)
    assert release_id(config.replace("repo", commit="f" * 40)) != release_id(config)
    assert release_id(make_config(spot=False)) != release_id(config)
    assert release_id(make_config("vm")) == ""  # vm mode does not roll


def test_on_demand_fleet_sends_no_capacity_tier():
    config = make_config(spot=False)
    request = queued_resource_request(config, config.fleet.workers[0])
    assert "spot" not in request and "guaranteed" not in request  # on-demand: no tier (issue 24)


def test_queued_fleet_stack_is_valid_terraform(stacks, tmp_path):
    if not shutil.which("terraform"):
        pytest.skip("terraform not installed")
    stack_dir = tmp_path / "fleet"
    shutil.copytree(stacks["queued"]["outdir"] / "stacks" / "fleet", stack_dir)
    env = {k: v for k, v in os.environ.items() if k != "TF_CLI_CONFIG_FILE"} | {"CHECKPOINT_DISABLE": "1"}
    for argv in (
        ["terraform", "init", "-backend=false", "-input=false", "-no-color"],
        ["terraform", "validate", "-no-color"],
    ):
        result = subprocess.run(argv, cwd=stack_dir, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# fleet, vm mode
# ---------------------------------------------------------------------------------------------------


def test_vm_fleet_uses_google_tpu_v2_vm_with_spot_metadata_account_labels(stacks):
    fleet = stacks["vm"]["fleet"]
    text = json.dumps(fleet)
    assert cdktf_testing().to_have_provider(text, "google-beta")
    assert cdktf_testing().to_have_resource_with_properties(
        text,
        "google_tpu_v2_vm",
        {
            "name": "${each.key}",
            "accelerator_type": "v5litepod-8",
            "runtime_version": "v2-alpha-tpuv5-lite",
            "scheduling_config": {"spot": True},
            "service_account": {
                "email": "actfleet-acts@my-project.iam.gserviceaccount.com",
                "scope": ["https://www.googleapis.com/auth/cloud-platform"],
            },
            "network_config": {"network": "default", "enable_external_ips": False},
        },
    )
    assert list(fleet["resource"]) == ["google_tpu_v2_vm"]
    vm = fleet["resource"]["google_tpu_v2_vm"]["workers"]
    assert vm["for_each"] == "${local.worker_specs}"
    assert "each.value" in vm["metadata"] and "each.value" in vm["labels"] and "each.value" in vm["zone"]
    specs = fleet["locals"]["worker_specs"]
    assert sorted(specs) == [f"tpu-us-central1-{z}-{i}" for z in "abc" for i in range(4)]
    spec = specs["tpu-us-central1-b-2"]
    assert spec["zone"] == "us-central1-b"
    assert spec["labels"] == {
        "actfleet-fleet": "acts",
        "managed-by": "actfleet",
        "actfleet-worker": "tpu-us-central1-b-2",
    }
    assert spec["metadata"]["startup-script"] == "${local.startup_script}"
    assert decoded(fleet["locals"]["startup_script"]) == startup_script()
    assert spec["metadata"]["actfleet-worker"] == "tpu-us-central1-b-2"


# ---------------------------------------------------------------------------------------------------
# fleet, every mode; gce mode
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["queued", "vm", "gce"])
def test_every_mode_is_one_for_each_block_over_the_worker_names_at_its_layout_address(stacks, mode):
    from actfleet.infra.terraform_layout import WORKER_RESOURCE_TYPES, WORKERS

    fleet = stacks[mode]["fleet"]
    assert list(fleet["resource"]) == [WORKER_RESOURCE_TYPES[mode]]
    assert list(fleet["resource"][WORKER_RESOURCE_TYPES[mode]]) == [WORKERS]
    block = fleet["resource"][WORKER_RESOURCE_TYPES[mode]][WORKERS]
    local = block["for_each"].removeprefix("${local.").removesuffix("}")
    source = {"worker_specs_held": "worker_specs"}.get(local, local)  # gce: the held view of worker_specs
    assert sorted(fleet["locals"][source]) == [f"tpu-us-central1-{z}-{i}" for z in "abc" for i in range(4)]
    assert decoded(fleet["locals"]["startup_script"]) == startup_script()


def test_gce_fleet_is_compute_instances_spot_stopped_without_external_ip_and_with_the_release(stacks):
    from actfleet.infra.gce_instance import SCOPES
    from actfleet.infra.release_id import RELEASE_LABEL

    fleet = stacks["gce"]["fleet"]
    assert list(fleet["provider"]) == ["google"]  # plain google: no google-beta, no local-exec
    vm = fleet["resource"]["google_compute_instance"]["workers"]
    assert vm["for_each"] == "${local.worker_specs_held}" and "provisioner" not in vm
    assert fleet["locals"]["worker_specs_held"] == "${{ for k, v in local.worker_specs : k => try(var.holds[k], v) }}"
    assert vm["scheduling"] == {
        "provisioning_model": "SPOT",
        "preemptible": True,
        "automatic_restart": False,
        "on_host_maintenance": "TERMINATE",
        "instance_termination_action": "STOP",
    }
    assert vm["network_interface"] == [{"network": "default"}]  # no access_config: no external IP
    assert vm["service_account"] == {
        "email": "actfleet-acts@my-project.iam.gserviceaccount.com",
        "scopes": list(SCOPES),
    }
    assert "cloud-platform" not in json.dumps(vm["service_account"])
    assert vm["boot_disk"]["initialize_params"]["image"] == GCE["boot_image"]
    assert vm["boot_disk"]["initialize_params"]["labels"] == "${each.value.disk_labels}"
    assert (vm["machine_type"], vm["metadata"], vm["labels"]) == (
        "${each.value.machine_type}",
        "${each.value.metadata}",
        "${each.value.labels}",
    )
    spec = fleet["locals"]["worker_specs"]["tpu-us-central1-b-2"]
    release = release_id(make_config("gce", **GCE))
    assert release.startswith("r") and spec["labels"][RELEASE_LABEL] == spec["disk_labels"][RELEASE_LABEL] == release
    assert spec["labels"]["actfleet-worker"] == "tpu-us-central1-b-2" and spec["zone"] == "us-central1-b"
    assert spec["metadata"]["startup-script"] == "${local.startup_script}"
    assert spec["metadata"]["actfleet-worker"] == "tpu-us-central1-b-2"
    assert spec["machine_type"] == "ct6e-standard-4t"


def test_gce_release_changes_with_what_a_worker_is_created_with():
    base = release_id(make_config("gce", **GCE))
    assert release_id(make_config("gce", **GCE)) == base
    assert release_id(make_config("gce", **GCE | {"boot_image": "projects/p/global/images/other"})) != base
    assert release_id(make_config("gce", **GCE, spot=False)) != base
    assert release_id(make_config("queued")) != base


def test_gce_fleet_stack_is_valid_for_the_google_provider_schema(stacks, tmp_path):
    """terraform validate against the provider stand-in's schema (the real google_compute_instance names,
    types and nesting: tests/fakes/google_provider), found through a filesystem mirror."""
    if not shutil.which("terraform"):
        pytest.skip("terraform not installed")
    from tests.fakes.google_provider.install import install

    stack_dir = tmp_path / "fleet"
    shutil.copytree(stacks["gce"]["outdir"] / "stacks" / "fleet", stack_dir)
    env = os.environ | {"CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": str(install(tmp_path / "tf"))}
    for argv in (
        ["terraform", "init", "-backend=false", "-input=false", "-no-color"],
        ["terraform", "validate", "-no-color"],
    ):
        result = subprocess.run(argv, cwd=stack_dir, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# the synth cache
# ---------------------------------------------------------------------------------------------------


def test_cache_key_follows_config_and_sources(tmp_path, monkeypatch):
    a, b = make_config(), make_config(accelerator_type="v6e-8")
    assert synth_cache.cache_key(a) == synth_cache.cache_key(make_config())
    assert synth_cache.cache_key(a) != synth_cache.cache_key(b)
    # An edit to a bootstrap file (or to the infra code that builds the stacks) is a new key.
    copies = []
    for src in synth_cache.SYNTH_SOURCES:
        copies.append(tmp_path / src.name)
        copies[-1].write_bytes(src.read_bytes())
    monkeypatch.setattr(synth_cache, "SYNTH_SOURCES", tuple(copies))
    before = synth_cache.cache_key(a)
    (tmp_path / "startup.sh").write_text((tmp_path / "startup.sh").read_text() + "# changed\n")
    assert synth_cache.cache_key(a) != before


def test_cached_synth_imports_no_cdktf(tmp_path):
    config_path = write_fleet_toml(
        tmp_path / "fleet.toml",
        zones={"us-central1-a": 2},
        commit="ab" * 20,
        state=tmp_path / "state",
        bucket="my-project-acts",
        job={"model": "m", "input": "i", "layers": [1]},
    )
    from actfleet.config import load

    first = synth_cache.synth(load(config_path), cache_dir=tmp_path / "cache")  # a miss: imports cdktf here
    assert not first.cached
    assert json.loads((first.stack_dir("fleet") / "cdk.tf.json").read_text())["locals"]["worker_requests"]
    probe = (
        "import sys, json\n"
        "from actfleet.config import load\n"
        "from actfleet.infra.synth_cache import synth\n"
        f"s = synth(load({str(config_path)!r}), cache_dir={str(tmp_path / 'cache')!r})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cdktf', 'jsii', 'constructs') or 'cdktf' in m]\n"
        "print(json.dumps({'cached': s.cached, 'dir': str(s.dir), 'imported': bad}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"cached": True, "dir": str(first.dir), "imported": []}


def test_main_py_rejects_a_bad_config_with_one_line(tmp_path):
    bad = tmp_path / "fleet.toml"
    bad.write_text('[fleet]\nid = "acts"\nmode = "spot"\n')
    result = subprocess.run(
        [sys.executable, "main.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "ACTFLEET_CONFIG": str(bad)},
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("actfleet: ")


@pytest.mark.slow
def test_cdktf_cli_synth_hcl_export_is_valid_terraform(tmp_path):
    """`make export-hcl`, the documented exit path off cdktf: the pinned CLI's HCL must be valid."""
    cdktf = ROOT / "node_modules" / ".bin" / "cdktf"
    if not cdktf.exists() or not shutil.which("terraform"):
        pytest.skip("cdktf-cli (npm ci) or terraform missing")
    config_path = tmp_path / "fleet.toml"
    config_path.write_text(
        (ROOT / "fleet.example.toml")
        .read_text()
        .replace('backend = "local"', f'backend = "local"\npath = "{tmp_path / "state"}"')
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CLI_CONFIG_FILE"}
    env |= {
        "ACTFLEET_CONFIG": str(config_path),
        "CHECKPOINT_DISABLE": "1",
        "PATH": f"{cdktf.parent}:{Path(sys.executable).parent}:{env['PATH']}",
    }
    out = tmp_path / "hcl"
    result = subprocess.run(
        [str(cdktf), "synth", "--hcl", "--output", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    fleet_tf = out / "stacks" / "fleet" / "cdk.tf"
    assert 'resource "terraform_data" "workers"' in fleet_tf.read_text()
    for argv in (
        ["terraform", "init", "-backend=false", "-input=false", "-no-color"],
        ["terraform", "validate", "-no-color"],
    ):
        check = subprocess.run(argv, cwd=fleet_tf.parent, env=env, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_prune_keeps_recent_and_young_entries(tmp_path):
    root = tmp_path / "cache"
    now = time.time()
    for i in range(5):
        entry = root / f"entry{i}"
        entry.mkdir(parents=True)
        age = 10 * 86400 if i < 3 else 60  # entry0-2 unused for ten days, entry3-4 used a minute ago
        os.utime(entry, (now - age - i, now - age - i))
    (root / ".plugins").mkdir()
    synth_cache.prune(root, keep=1, protect=root / "entry0")
    # Beyond the newest one: old ones go (except the protected one), young ones and dot-dirs stay.
    assert sorted(p.name for p in root.iterdir()) == [".plugins", "entry0", "entry3", "entry4"]
