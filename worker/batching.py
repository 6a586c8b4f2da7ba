"""The packing plan: which sequences share which row of which batch. A pure function of the lengths.

Rows have a fixed length P (a power of two >= the longest sequence, at least MIN_ROW), and a full batch is
`per_batch` rows with per_batch * P ~= batch_tokens (a multiple of the device count, so the batch dimension
shards evenly). Sequences are packed first-fit-decreasing, so rows are nearly full and padding is a small
fraction of computed tokens.

Shapes come from a small fixed set, so a run compiles a handful of programs and a job a bounded number
(each once per machine: the persistent compilation cache keeps them). The last batch of a run is shrunk to
the fewest rows among the allowed sizes (`bucket_rows`): per device, every count up to 16, then 8 steps per doubling (18, 20, ..,
32, 36, 40, .., 64, ...), i.e. 16 + 8 * log2(per_batch / 16) sizes at most per row length. Its empty rows
are fewer than 1/8 of its own rows (the step is at most 1/16 of the next power of two), where rounding
to eighths of a full batch wasted up to 7/8 of a small run's compute (18 rows -> 24 of 64).

The plan depends only on the ordered list of lengths, which is what makes the stored bits of a work unit
reproducible: the same rows always land in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_ROW = 128
STEPS_PER_DOUBLING = 8  # row-count buckets between two powers of two (see bucket_rows)


@dataclass(frozen=True)
class PlannedBatch:
    row_len: int
    rows: tuple[tuple[int, ...], ...]  # per row, the indices (into the lengths list) packed in it, in order

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.row_len


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_length(longest: int) -> int:
    return max(MIN_ROW, next_pow2(longest))


def rows_per_batch(row_len: int, *, batch_tokens: int, n_devices: int = 1) -> int:
    """Rows of a full batch of rows this long: about batch_tokens tokens, a multiple of the device count."""
    return max(n_devices, (max(1, batch_tokens // row_len) // n_devices) * n_devices)


def bucket_rows(n: int, *, per_batch: int, n_devices: int = 1) -> int:
    """n rows (1..per_batch) rounded up to the next allowed batch size (see the module docstring)."""
    per_device = -(-n // n_devices)
    step = max(1, next_pow2(per_device) // (2 * STEPS_PER_DOUBLING))
    return min(per_batch, -(-per_device // step) * step * n_devices)


def plan(lengths: list[int], *, batch_tokens: int, n_devices: int = 1) -> list[PlannedBatch]:
    """Pack sequences of these lengths (all >= 1) into batches. Index i refers to lengths[i]."""
    if not lengths:
        return []
    if min(lengths) < 1:
        raise ValueError("every sequence needs at least one token")
    p = row_length(max(lengths))
    per_batch = rows_per_batch(p, batch_tokens=batch_tokens, n_devices=n_devices)

    # First-fit decreasing: longest first, each into the first row with room (ties keep input order).
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(p - n)

    batches = []
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        size = bucket_rows(len(chunk), per_batch=per_batch, n_devices=n_devices)
        chunk = chunk + [[] for _ in range(size - len(chunk))]
        batches.append(PlannedBatch(p, tuple(tuple(r) for r in chunk)))
    return batches
