"""infra/: the cdktf stacks, the TPU API client, reconcile and status (DESIGN sections 3-4)."""
