"""actfleet.worker (worker/): the JAX extractor, the work queue, the shard format and its reader (docs/extractor.md, docs/jobs.md)."""
