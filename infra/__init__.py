"""actfleet.infra (infra/): the cdktf stacks, the TPU API client, reconcile and status (docs/infrastructure.md, docs/operations.md)."""
