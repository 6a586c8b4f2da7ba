"""Test helpers: a dataset reference read as a worker reads it, through the one input API (sources.resolve ->
pinning.pin_files -> inputs.read_source_rows over the pinned copies)."""

from __future__ import annotations

from actfleet.worker import inputs, pinning, sources


def pin(ref: str, **source_options):
    """(the pinned DataFiles of `ref`, local(file) -> its pinned copy in the data cache)."""
    files, _ = pinning.pin_files(sources.resolve(ref, **source_options))
    return files, pinning.pinned_file


def read_rows(ref: str, *, start: int = 0, stop: int | None = None, **options):
    """Rows (sample id, text or token ids, reason) of the whole input, or of [start, stop)."""
    files, local = pin(ref)
    if stop is None:
        stop = count_rows(files, **options)
    return inputs.read_source_rows(files, local, start=start, stop=stop, **options)


def count_rows(files, *, format: str = "text", arc_augmentations: int = 0, **_reading) -> int:
    """Sample ids of pinned files (bad rows included), as prepare counts them."""
    return sum(f.rows for f in files) * (arc_augmentations + 1 if format == "arc" else 1)
