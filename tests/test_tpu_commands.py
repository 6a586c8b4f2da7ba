"""`actfleet tpu ...` run as Terraform's provisioners run it: a subprocess, flags and environment only,
against the fake TPU API started by its own command line (`python -m tests.fakes.tpu_server`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACTFLEET = str(Path(sys.executable).with_name("actfleet"))
PROJECT, ZONE, QR_ID = "test-project", "us-central1-a", "tpu-us-central1-a-0"
QR_PATH = f"projects/{PROJECT}/locations/{ZONE}/queuedResources/{QR_ID}"
TARGET = ["--project", PROJECT, "--zone", ZONE, "--id", QR_ID]


def qr_request(zone: str = ZONE, node_id: str = QR_ID, script: str = "echo hi") -> dict:
    return {
        "tpu": {
            "nodeSpec": [
                {
                    "parent": f"projects/{PROJECT}/locations/{zone}",
                    "nodeId": node_id,
                    "node": {
                        "acceleratorType": "v5litepod-8",
                        "runtimeVersion": "v2-alpha-tpuv5-lite",
                        "labels": {"actfleet-fleet": "acts", "managed-by": "actfleet"},
                        "metadata": {"startup-script": script},
                    },
                }
            ]
        },
        "spot": {},
    }


@pytest.fixture(scope="module")
def fake_url():
    """The fake as a person (or CI) starts it: its command line, printing its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.tpu_server", "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def fake(fake_url):
    control(fake_url, "reset")
    return fake_url


def control(url: str, name: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{url}/_fake/{name}", data=json.dumps(body or {}).encode(), method="POST")
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def fake_get(url: str, name: str) -> dict:
    with urllib.request.urlopen(f"{url}/_fake/{name}") as r:
        return json.loads(r.read())


def qr_states(url: str) -> dict[str, str]:
    return {q["name"]: q["state"]["state"] for q in fake_get(url, "state")["queuedResources"]}


def actfleet(url: str, *args: str, stdin: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTFLEET_")}
    env["ACTFLEET_TPU_ENDPOINT"] = url
    return subprocess.run(
        [ACTFLEET, "tpu", *args],
        input=stdin if stdin is not None else "",
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_create_is_idempotent_from_file_json_or_stdin(fake, tmp_path):
    body = json.dumps(qr_request())
    request_file = tmp_path / "request.json"
    request_file.write_text(body)

    first = actfleet(fake, "create-qr", *TARGET, "--request-file", str(request_file))
    assert (first.returncode, first.stdout, first.stderr) == (0, f"created queued resource {QR_PATH}\n", "")
    for extra, stdin in ((["--request-json", body], None), ([], body)):
        again = actfleet(fake, "create-qr", *TARGET, *extra, stdin=stdin)
        assert again.returncode == 0, again.stderr
        assert again.stdout == f"queued resource {QR_PATH} already exists with this request: nothing to do\n"

    assert qr_states(fake) == {QR_PATH: "ACTIVE"}
    posts = [c for c in fake_get(fake, "calls")["calls"] if c["method"] == "POST"]
    assert len(posts) == 1


def test_create_of_an_existing_resource_with_another_request_fails(fake):
    assert actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request())).returncode == 0
    r = actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request(script="echo new")))
    assert r.returncode == 1
    assert r.stderr == (
        f"actfleet: TPU API: queued resource {QR_PATH} already exists with a different request "
        "(differs at tpu.nodeSpec[0].node.metadata.startup-script): delete it first, or let "
        "reconcile replace it\n"
    )


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["--request-json", '{"tpu": '], None, "actfleet: --request-json: not valid JSON: "),
        ([], "not json", "actfleet: stdin: not valid JSON: "),
        (["--request-json", '{"tpu": {"nodeSpec": []}}'], None, "the request has no tpu.nodeSpec entries"),
        (
            ["--request-json", json.dumps(qr_request(zone="us-central1-b"))],
            None,
            'tpu.nodeSpec[0].parent = "projects/test-project/locations/us-central1-b": must be',
        ),
        (["--request-json", json.dumps({**qr_request(), "labels": {"a": "b"}})], None, 'has no field named "labels"'),
    ],
)
def test_bad_request_json_exits_2_with_one_line_and_calls_nothing(fake, args, stdin, message):
    r = actfleet(fake, "create-qr", *TARGET, *args, stdin=stdin)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert r.stdout == ""
    assert fake_get(fake, "calls")["calls"] == []


def test_bad_flags_exit_2(fake):
    r = actfleet(fake, "delete-qr", "--project", PROJECT, "--zone", "central", "--id", QR_ID)
    assert (r.returncode, r.stderr) == (2, 'actfleet: --zone "central": must look like "us-central1-a"\n')
    r = actfleet(fake, "delete-qr", "--project", PROJECT, "--zone", ZONE)
    assert r.returncode == 2 and "Missing option '--id'" in r.stderr


def test_api_errors_exit_1_naming_the_resource(fake):
    control(fake, "fail", {"status": 403, "count": None})
    r = actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request()))
    assert r.returncode == 1
    assert r.stderr == (
        f"actfleet: TPU API: queued resource {QR_PATH}: 403 permission denied: "
        "The caller does not have permission (injected by the fake)\n"
    )
    r = actfleet(fake, "delete-qr", *TARGET)
    assert r.returncode == 1 and r.stderr.startswith(f"actfleet: TPU API: queued resource {QR_PATH}: 403 ")


def test_transient_errors_are_retried_inside_the_command(fake):
    control(fake, "fail", {"status": 503, "count": 1, "method": "GET"})
    control(fake, "fail", {"status": 429, "count": 1, "method": "POST"})
    r = actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request()))
    assert r.returncode == 0, r.stderr
    assert [c["status"] for c in fake_get(fake, "calls")["calls"]] == [503, 404, 429, 200]
    assert qr_states(fake) == {QR_PATH: "ACTIVE"}


def test_delete_is_idempotent_and_takes_the_node(fake):
    actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request()))
    control(fake, "config", {"delete_delay": 0.3})
    try:
        r = actfleet(fake, "delete-qr", *TARGET)
    finally:
        control(fake, "config", {"delete_delay": 0.0})
    assert (r.returncode, r.stdout) == (0, f"deleted queued resource {QR_PATH} and its node\n")
    state = fake_get(fake, "state")
    assert state["queuedResources"] == [] and state["nodes"] == []  # gone when the command returned

    r = actfleet(fake, "delete-qr", *TARGET)
    assert (r.returncode, r.stdout) == (0, f"queued resource {QR_PATH} does not exist: nothing to do\n")


def test_delete_of_a_stuck_suspended_queued_resource_is_sent_again(fake):
    """The destroy-time provisioner's path: a SUSPENDED queued resource whose first delete is accepted but
    leaves it there is deleted again, and the command returns only once a GET says NOT_FOUND."""
    control(fake, "create-qr", {"zone": ZONE, "id": QR_ID, "project": PROJECT, "state": "SUSPENDED"})
    control(fake, "stick-delete", {"zone": ZONE, "id": QR_ID, "times": 1})
    r = actfleet(fake, "delete-qr", *TARGET)
    assert r.returncode == 0, r.stderr
    assert f"{QR_PATH}: still SUSPENDED after a delete: deleting it again" in r.stderr
    deletes = [c for c in fake_get(fake, "calls")["calls"] if c["method"] == "DELETE"]
    assert [c["status"] for c in deletes] == [200, 200]
    assert qr_states(fake) == {}


def test_create_over_a_failed_queued_resource_replaces_it(fake):
    control(
        fake,
        "create-qr",
        {
            "zone": ZONE,
            "id": QR_ID,
            "project": PROJECT,
            "state": "FAILED",
            "error": ["RESOURCE_EXHAUSTED", "There is no more capacity in the zone"],
        },
    )
    r = actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request()))
    assert (r.returncode, r.stdout) == (0, f"created queued resource {QR_PATH}\n"), r.stderr
    assert qr_states(fake) == {QR_PATH: "ACTIVE"}


def test_replace_after_preemption_is_delete_then_create(fake):
    body = json.dumps(qr_request())
    actfleet(fake, "create-qr", *TARGET, "--request-json", body)
    control(fake, "preempt", {"zone": ZONE, "id": QR_ID})
    assert qr_states(fake) == {QR_PATH: "SUSPENDED"}
    # What `terraform apply -replace=...` runs: the destroy provisioner, then the create provisioner.
    assert actfleet(fake, "delete-qr", *TARGET).returncode == 0
    assert actfleet(fake, "create-qr", *TARGET, "--request-json", body).returncode == 0
    assert qr_states(fake) == {QR_PATH: "ACTIVE"}


def fleet_toml(tmp_path: Path) -> Path:
    text = (
        (REPO / "fleet.example.toml")
        .read_text()
        .replace('"my-gcp-project"', f'"{PROJECT}"', 1)
        .replace('zones = { "us-central1-a" = 8 }', 'zones = { "us-central1-a" = 4, "us-central1-b" = 4 }')
    )  # two zones to list
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    return p


def test_list_shows_queued_resources_and_nodes_across_zones(fake, tmp_path):
    config = fleet_toml(tmp_path)  # zones us-central1-a and us-central1-b, fleet id "acts"
    actfleet(fake, "create-qr", *TARGET, "--request-json", json.dumps(qr_request()))
    control(fake, "stockout", {"zone": "us-central1-b"})
    b_target = ["--project", PROJECT, "--zone", "us-central1-b", "--id", "tpu-us-central1-b-0"]
    actfleet(
        fake, "create-qr", *b_target, "--request-json", json.dumps(qr_request("us-central1-b", "tpu-us-central1-b-0"))
    )

    r = actfleet(fake, "list", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    zones = out["zones"]
    assert out["project"] == PROJECT and set(zones) == {"us-central1-a", "us-central1-b"}
    assert [(q["name"], q["state"]) for q in zones["us-central1-a"]["queued_resources"]] == [(QR_ID, "ACTIVE")]
    assert [(n["name"], n["state"]) for n in zones["us-central1-a"]["nodes"]] == [(QR_ID, "READY")]
    assert [q["state"] for q in zones["us-central1-b"]["queued_resources"]] == ["WAITING_FOR_RESOURCES"]

    r = actfleet(fake, "list", "--config", str(config))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ZONE", "KIND", "NAME", "STATE", "HEALTH", "FLEET", "AGE"]
    assert any(line.split()[:6] == ["us-central1-a", "node", QR_ID, "READY", "HEALTHY", "this"] for line in lines)
    assert any(
        line.split()[:4] == ["us-central1-b", "qr", "tpu-us-central1-b-0", "WAITING_FOR_RESOURCES"] for line in lines
    )


def test_list_reports_a_failing_zone_and_exits_1(fake, tmp_path):
    config = fleet_toml(tmp_path)
    control(fake, "fail", {"zone": "us-central1-b", "status": 403, "count": None})
    r = actfleet(fake, "list", "--config", str(config), "--json")
    assert r.returncode == 1
    zones = json.loads(r.stdout)["zones"]
    assert zones["us-central1-a"] == {"queued_resources": [], "nodes": []}
    assert "403 permission denied" in zones["us-central1-b"]["error"]
    r = actfleet(fake, "list", "--config", str(config))
    assert r.returncode == 1
    assert "actfleet: us-central1-b: TPU API: list " in r.stderr


def test_list_without_a_config_is_bad_input(fake, tmp_path):
    r = actfleet(fake, "list", cwd=tmp_path)
    assert r.returncode == 2 and "config file not found" in r.stderr
