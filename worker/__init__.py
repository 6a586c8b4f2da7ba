"""actfleet.worker (worker/): the JAX extractor, the work loop, the shard format and its reader (docs/extractor.md,
docs/jobs.md); the work-queue protocol it follows is shared ground, actfleet/work_queue.py."""
