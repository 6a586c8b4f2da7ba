"""The three shapes data takes between the input readers, the preparer and the runner, each defined once:

Row    (sample id, text or token ids, skip reason)   worker/inputs.py reads these
Sample one sequence to compute: token ids + which to store (worker/preparer.py makes these from rows)
Batch  stored tokens of some samples with their activations (worker/runner.py yields these)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A row read from the dataset: (sample id, text or token ids (options.tokens_field), skip reason). Exactly one
# of text-or-ids and reason is set.
Row = tuple[int, "str | list[int] | None", "str | None"]


@dataclass(frozen=True)
class Sample:
    """One sequence the model computes: a whole (possibly truncated) row, or one context window."""

    sample_id: int
    token_ids: np.ndarray  # int32 [n]
    store_mask: np.ndarray  # bool [n]: which positions are stored (--positions)
    # Context windows only: per token, the input row it came from and its position there (-1: inserted).
    source_rows: np.ndarray | None = None  # int64 [n]
    source_positions: np.ndarray | None = None  # int32 [n]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def stored(self) -> int:
        return int(self.store_mask.sum())


@dataclass
class Batch:
    """Stored tokens of some samples, sorted by (sample_id, position), plus counters."""

    token_ids: np.ndarray  # int32 [n]
    sample_ids: np.ndarray  # int64 [n]
    positions: np.ndarray  # int32 [n]
    acts: dict[str, np.ndarray]  # site -> [n, d] in the store dtype
    rows: int = 0  # input rows accounted for by this batch (stored here, or skipped)
    computed_tokens: int = 0  # batch shape's tokens, padding included
    padded_tokens: int = 0
    truncated: int = 0
    skipped: dict[int, str] = field(default_factory=dict)  # sample_id (input row) -> reason
    source_rows: np.ndarray | None = None  # int64 [n], context windows only: the input row of each token
    source_positions: np.ndarray | None = None  # int32 [n]: its position in that row (-1: inserted BOS/separator)
    # site -> actfleet.worker.stats.SiteStats of these rows, computed on the device (None: not computed; the
    # work loop then computes them on the host when the job wants statistics)
    stats: dict | None = None

    @property
    def stored_tokens(self) -> int:
        return len(self.sample_ids)

    def stored_rows(self) -> set[int]:
        """The input rows with at least one token in this batch (a window's tokens name their source rows)."""
        ids = self.sample_ids if self.source_rows is None else self.source_rows
        return set(np.unique(ids).tolist())
