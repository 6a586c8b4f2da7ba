"""gce mode: a failed apply's per-worker errors come from the provider's diagnostics (no provisioners there),
so a stockout is classed as one and backs the worker off like a queued-mode create failure. The output is
what `terraform apply` printed against the google provider stand-in and the fake's stockout."""

from actfleet.infra.reconcile import worker_errors

STOCKOUT = """google_compute_instance.workers["tpu-us-central1-a-0"]: Creating...

Error: Error waiting for instance to create: ZONE_RESOURCE_POOL_EXHAUSTED: The zone 'projects/p/zones/us-central1-a' does not have enough resources available to fulfill the request.  Try a different zone, or try again later.

  with google_compute_instance.workers["tpu-us-central1-a-0"],
  on cdk.tf.json line 96, in resource.google_compute_instance.workers:
  96:       }

Error: Error creating instance: 403 POST http://127.0.0.1:1/compute/v1/projects/p/zones/us-central1-b/instances: Required 'compute.instances.create' permission

  with google_compute_instance.workers["tpu-us-central1-b-1"],
  on cdk.tf.json line 96, in resource.google_compute_instance.workers:
"""


def test_provider_diagnostics_name_the_worker_and_class_its_error():
    errors = worker_errors(STOCKOUT)
    assert sorted(errors) == ["tpu-us-central1-a-0", "tpu-us-central1-b-1"]
    stockout = errors["tpu-us-central1-a-0"]
    assert (stockout["code"], stockout["class"]) == ("ZONE_RESOURCE_POOL_EXHAUSTED", "quota")
    assert stockout["message"].startswith("Error waiting for instance to create: ZONE_RESOURCE_POOL_EXHAUSTED")
    assert errors["tpu-us-central1-b-1"]["class"] == "permission"


def test_an_error_naming_no_worker_is_no_worker_error():
    assert (
        worker_errors(
            'Error: Invalid provider configuration\n\n  with provider["registry.terraform.io/hashicorp/google"],\n'
        )
        == {}
    )


def test_queued_mode_provisioner_errors_are_read_as_before():
    output = (
        'terraform_data.workers["tpu-us-central1-a-0"] (local-exec): actfleet: TPU API: queued resource x: '
        "403 permission denied: nope\n\nError: local-exec provisioner error\n\n"
        '  with terraform_data.workers["tpu-us-central1-a-0"],\n'
    )
    assert worker_errors(output) == {
        "tpu-us-central1-a-0": {"code": "PERMISSION_DENIED", "message": "nope", "class": "permission"}
    }
