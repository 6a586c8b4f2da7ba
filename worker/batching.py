"""The packing plan: which sequences share which row of which batch. A pure function of the lengths.

Rows have a fixed length P (a power of two >= the longest sequence, at least MIN_ROW), and a batch is
`rows_per_batch` rows with rows_per_batch * P ~= batch_tokens (a multiple of the device count, so the batch
dimension shards evenly). Sequences are packed first-fit-decreasing, so rows are nearly full and padding is
a small fraction of computed tokens. The last batch is shrunk to a multiple of 1/8 of a full batch. Shapes
therefore come from a small fixed set -- (k/8 of a batch's rows, power-of-two length) -- and compile once each.

The plan depends only on the ordered list of lengths, which is what makes the stored bits of a work unit
reproducible: the same rows always land in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_ROW = 128


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


def plan(lengths: list[int], *, batch_tokens: int, n_devices: int = 1) -> list[PlannedBatch]:
    """Pack sequences of these lengths (all >= 1) into batches. Index i refers to lengths[i]."""
    if not lengths:
        return []
    if min(lengths) < 1:
        raise ValueError("every sequence needs at least one token")
    p = row_length(max(lengths))
    per_batch = max(n_devices, (max(1, batch_tokens // p) // n_devices) * n_devices)

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
        chunk = rows[start: start + per_batch]
        # A short final batch is rounded up to a multiple of an eighth of a full batch (and of the devices):
        # at most 8 shapes per row length, and at most 1/8 of a batch of empty rows.
        granule = max(n_devices, (per_batch // 8 // n_devices) * n_devices)
        size = min(per_batch, -(-len(chunk) // granule) * granule)
        chunk = chunk + [[] for _ in range(size - len(chunk))]
        batches.append(PlannedBatch(p, tuple(tuple(r) for r in chunk)))
    return batches
