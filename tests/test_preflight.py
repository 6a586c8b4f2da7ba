"""`actfleet preflight` (infra/preflight.py) against tests/fakes/google_apis.py: every check passes on a ready
project, and each unready part fails on its own line with the command that fixes it (issue 24.5)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from actfleet import accelerators
from actfleet.config import parse
from actfleet.errors import ConfigError
from actfleet.infra import preflight as pf
from tests.fakes.google_apis import FakeGoogleApis

V5E_SPOT = "TPUV5sPreemptibleLitepodPerProjectPerZoneForTPUAPI"


def config(**fleet):
    return parse(
        {
            "fleet": {
                "id": "acts",
                "project": "my-project",
                "region": "us-central1",
                "zones": {"us-central1-a": 8, "us-central1-b": 2},
            }
            | fleet,  # fmt: skip
            "repo": {"url": "https://example.com/r.git", "commit": "a" * 40},
            "storage": {"bucket": "my-project-acts"},
            "job": {"model": "m", "input": "i", "layers": [1]},
        }
    )


@pytest.fixture
def apis():
    with FakeGoogleApis.start() as fake:
        cfg = config()
        fake.ready("my-project", "default", {"us-central1-a": 64, "us-central1-b": 16}, V5E_SPOT,
                   cfg.fleet.service_account_email)  # fmt: skip
        yield fake


def outcomes(fake, cfg=None):
    return {o.name: o for o in pf.run(cfg or config(), pf.Api(endpoint=fake.url))}


def test_a_ready_project_passes_every_check_one_line_each(apis):
    got = outcomes(apis)
    assert list(got) == [
        "api compute", "api tpu", "api iam", "api cloudresourcemanager", "api storage",
        "network", "quota us-central1-a", "quota us-central1-b", "act as workers", "runtime",
    ]  # fmt: skip
    assert {o.status for o in got.values()} == {"ok"}, got
    assert got["quota us-central1-a"].detail == f"{V5E_SPOT} in us-central1-a: limit 64 >= 64 needed"
    assert len(pf.lines(list(got.values()))) == 10  # no fix lines when nothing fails


def test_each_unready_part_fails_with_its_fix(apis):
    apis.enabled.discard("tpu.googleapis.com")
    apis.networks.clear()
    apis.quotas[V5E_SPOT]["us-central1-b"] = 8  # 2 x v5litepod-8 need 16
    apis.act_as.clear()
    got = outcomes(apis)
    bad = {n: o for n, o in got.items() if o.status == "FAIL"}
    assert set(bad) == {"api tpu", "network", "quota us-central1-b", "act as workers"}
    assert bad["api tpu"].fix == "gcloud services enable tpu.googleapis.com --project my-project"
    assert bad["network"].fix.startswith("gcloud compute networks create default")
    assert bad["quota us-central1-b"].detail == f"{V5E_SPOT} in us-central1-b: limit 8 < 16 the fleet needs"
    assert (
        f"--quota-id={V5E_SPOT} --preferred-value=16 --dimensions=zone=us-central1-b" in bad["quota us-central1-b"].fix
    )
    assert "roles/iam.serviceAccountUser" in bad["act as workers"].fix
    assert got["quota us-central1-a"].status == "ok"


def test_a_zone_without_its_own_value_uses_the_default_and_on_demand_uses_its_own_quota(apis):
    apis.quotas[V5E_SPOT] = {"": 64}
    assert outcomes(apis)["quota us-central1-b"].status == "ok"
    on_demand = config(spot=False)
    got = outcomes(apis, on_demand)["quota us-central1-a"]
    assert got.status == "FAIL" and "TPUV5sLitepodPerProjectPerZoneForTPUAPI" in got.detail


def test_an_account_not_yet_created_is_skipped_and_a_denied_api_is_a_failure_not_a_traceback(apis):
    apis.accounts.clear()
    apis.deny(r"/services/compute\.googleapis\.com$", 403)
    got = outcomes(apis)
    assert got["act as workers"].status == "skip" and "base stack creates it" in got["act as workers"].detail
    assert got["api compute"].status == "FAIL" and "HTTP 403" in got["api compute"].detail


@pytest.mark.parametrize(
    "accelerator,runtime,ok",
    [
        ("v6e-8", "v2-alpha-tpuv6e", True),
        ("v6e-8", "v2-alpha-tpuv5-lite", False),
        ("v5litepod-8", "v2-alpha-tpuv5-lite", True),
        ("v5p-8", "v2-alpha-tpuv5", True),
        ("v4-8", "tpu-ubuntu2204-base", True),
        ("v4-8", "v2-alpha-tpuv6e", False),
    ],
)
def test_runtime_version_must_fit_the_accelerator(accelerator, runtime, ok):
    cfg = config(accelerator_type=accelerator, runtime_version=runtime)
    status, detail = pf.probe_runtime(cfg, None)
    assert (status == "ok") == ok, detail
    if not ok:
        assert accelerators.runtimes(accelerator)[0] in detail


def test_the_endpoint_seam_accepts_only_loopback():
    with pytest.raises(ConfigError, match="only a loopback"):
        pf.Api(endpoint="https://evil.example.com")


def test_the_command_exits_1_naming_the_failures(apis, tmp_path):
    apis.networks.clear()
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        '[fleet]\nid = "acts"\nproject = "my-project"\nregion = "us-central1"\n'
        'zones = { "us-central1-a" = 8, "us-central1-b" = 2 }\n'
        f'[repo]\nurl = "https://example.com/r.git"\ncommit = "{"a" * 40}"\n[storage]\nbucket = "my-project-acts"\n'
        '[job]\nmodel = "m"\ninput = "i"\nlayers = [1]\n'
    )
    argv = [sys.executable, "-c", "from actfleet.cli import main; main()", "preflight", "--config", str(toml)]
    env = {"ACTFLEET_GOOGLE_API_ENDPOINT": apis.url, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == "actfleet: preflight: 1 check(s) failed: network"
    assert "FAIL  network" in r.stdout and "fix: gcloud compute networks create default" in r.stdout


def test_gce_mode_checks_the_boot_image_not_a_runtime_and_not_the_tpu_apis_quota(apis):
    bare = config(mode="gce", accelerator_type="v6e-8")
    got = outcomes(apis, bare)
    assert got["runtime"].status == pf.FAIL and "fleet.boot_image" in got["runtime"].detail
    assert any("set fleet.boot_image" in line for line in pf.lines(list(got.values())))
    assert {got[f"quota {z}"].status for z in ("us-central1-a", "us-central1-b")} == {pf.SKIP}
    imaged = outcomes(apis, config(mode="gce", accelerator_type="v6e-8", boot_image="projects/p/global/images/i"))
    assert imaged["runtime"].status == pf.SKIP and "projects/p/global/images/i" in imaged["runtime"].detail
