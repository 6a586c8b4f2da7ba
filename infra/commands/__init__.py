"""The infra wing's Click commands: synth/plan/deploy/destroy, tpu, reconcile, status."""
