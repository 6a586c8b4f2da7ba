"""worker/: the JAX extractor, the work queue, the object stores, the shard format (DESIGN sections 5-6)."""
