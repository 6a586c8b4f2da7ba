"""The host side of extraction: rows in, a `Prepared` unit out (tokenized, long-input policy applied, packing
planned). Nothing here touches a device, so a unit is prepared while the runner (worker/runner.py) computes
the one before it.

Determinism: the plan is a pure function of the rows given to one `prepare` call (actfleet.worker.batching),
so the same rows always give the same samples in the same places, and the same stored bits.

Context windows (options.context_size N > 0, docs/jobs.md): the rows of one `prepare` call are tokenized
without special tokens, joined (separator, BOS at each window start) and cut into windows of exactly N tokens,
as SAELens's concat_and_batch_sequences does; each window is a Sample (sample id = first row of the call
* 2**20 + window number) carrying per token the source row and the position in that row (-1 for an inserted
BOS or separator). Windows never span two `prepare` calls (two units); a call's final partial window is
dropped, as SAELens drops the stream's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import batching
from actfleet.worker.samples import Row, Sample

WINDOW_ID_BITS = 20  # window sample id = first row of the unit << 20 | window number within the unit

TokenRow = tuple[int, "np.ndarray | None", "str | None"]  # (sample id, token ids, skip reason)


@dataclass
class Prepared:
    """A row list made ready to run: its samples, what was skipped and why, and the packing plan."""

    samples: list[Sample]
    skipped: dict[int, str]  # input row -> reason
    truncated: int
    n_rows: int  # input rows accounted for (stored or skipped)
    plan: list[batching.PlannedBatch]  # indices into samples
    stored: list[int]  # stored tokens per planned batch
    windows: bool  # context windows: a batch counts the input rows behind its tokens, not its samples

    @property
    def batches(self) -> int:
        """Batches `Runner.run_stream` yields for this unit (one empty one when nothing is computed)."""
        return len(self.plan) or (1 if self.n_rows else 0)


class Preparer:
    """Tokenizes rows and plans their batches for one job's options. `n_devices`: the mesh's data-axis size
    (a batch's rows are a multiple of it)."""

    def __init__(self, options: JobOptions, tokenizer, *, vocab_size: int, max_seq: int, n_devices: int = 1):
        self.options, self.tokenizer = options, tokenizer
        self.vocab_size, self.max_seq, self.n_devices = vocab_size, max_seq, n_devices
        special = set(tokenizer.all_special_ids)
        if tokenizer.bos_token_id is not None:
            special.add(tokenizer.bos_token_id)
        self.special_ids = np.array(sorted(special), dtype=np.int32)

    def tokenize(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in enc]

    def token_rows(self, rows: list[Row], add_special_tokens: bool = True) -> list[TokenRow]:
        """(sample id, token ids | None, reason): texts tokenized in one call; pre-tokenized rows (lists of ids,
        options.tokens_field) checked against the vocabulary (InputError naming the row and field)."""
        texts = [t for _, t, reason in rows if not reason and isinstance(t, str)]
        enc = iter(self.tokenize(texts, add_special_tokens))
        out: list[TokenRow] = []
        for sid, t, reason in rows:
            if reason:
                out.append((sid, None, reason))
            elif isinstance(t, str):
                out.append((sid, next(enc), None))
            else:
                ids = np.asarray(t, dtype=np.int64)
                bad = np.nonzero((ids < 0) | (ids >= (self.vocab_size or 1 << 31)))[0]
                if len(bad):
                    raise InputError(
                        f"row {sid}: field {self.options.tokens_field!r} holds token id {ids[bad[0]]}, "
                        f"outside the model's vocabulary (0..{self.vocab_size - 1})"
                    )
                out.append((sid, ids.astype(np.int32), None))
        return out

    def store_mask(self, ids: np.ndarray) -> np.ndarray:
        if self.options.positions == "all":
            return np.ones(len(ids), bool)
        if self.options.positions == "last":
            mask = np.zeros(len(ids), bool)
            mask[-1] = True
            return mask
        return ~np.isin(ids, self.special_ids)

    def prepare(self, rows: Iterable[Row]) -> Prepared:
        """Tokenize, apply the long-input policy (or cut context windows), plan the packing."""
        rows = list(rows)
        if self.options.context_size:
            return self.prepare_windows(self.token_rows(rows, add_special_tokens=False))
        return self.prepare_tokens(self.token_rows(rows))

    def prepare_tokens(self, rows: Iterable[TokenRow]) -> Prepared:
        """`prepare` on already tokenized rows."""
        skipped: dict[int, str] = {}
        truncated = 0
        samples: list[Sample] = []
        n_rows = 0
        for sid, ids, reason in rows:
            n_rows += 1
            if reason:
                skipped[sid] = reason
                continue
            ids = np.asarray(ids, dtype=np.int32)
            if len(ids) == 0:
                skipped[sid] = "empty text"
                continue
            if len(ids) > self.max_seq:
                if self.options.long_inputs == "skip":
                    skipped[sid] = f"longer than max_seq ({self.max_seq} tokens)"
                    continue
                ids, truncated = ids[: self.max_seq], truncated + 1
            mask = self.store_mask(ids)
            if not mask.any():
                skipped[sid] = "no tokens to store (all special)"
                continue
            samples.append(Sample(sid, ids, mask))
        return self._planned(samples, skipped, truncated, n_rows, windows=False)

    def prepare_windows(self, rows: list[TokenRow]) -> Prepared:
        o, tok = self.options, self.tokenizer
        # A tokenizer without a BOS token (Qwen2's) uses EOS for it, as TransformerLens (and so SAELens) does.
        bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        bos = bos_id if o.prepend_bos else None
        if o.prepend_bos and bos is None:
            raise InputError("--prepend-bos: the tokenizer has no BOS (nor EOS) token; pass --no-prepend-bos")
        sep = {"eos": tok.eos_token_id, "bos": bos_id, "none": None}[o.separator]
        if o.separator != "none" and sep is None:
            raise InputError(
                f"--separator {o.separator}: the tokenizer has no {o.separator.upper()} token; pass "
                f"--separator none or another"
            )
        if bos is not None and o.context_size < 2:
            raise InputError("--context-size 1 with --prepend-bos leaves no room for text: use 2 or more")
        docs, skipped = [], {}
        for sid, ids, reason in rows:
            if reason:
                skipped[sid] = reason
            elif ids is None or len(ids) == 0:
                skipped[sid] = "empty text"
            else:
                docs.append((sid, np.asarray(ids, np.int32)))
        windows = cut_windows(docs, o.context_size, bos=bos, sep=sep, concat=o.concat)
        base = rows[0][0] << WINDOW_ID_BITS if rows else 0
        if len(windows) >= 1 << WINDOW_ID_BITS:
            raise InputError(f"{len(windows)} context windows in one unit: use a smaller unit (--unit-rows)")
        samples, stored, in_windows = [], set(), set()
        for k, (ids, src_rows, src_pos) in enumerate(windows):
            mask = self.store_mask(ids)
            stored.update(np.unique(src_rows[mask]).tolist())
            in_windows.update(np.unique(src_rows).tolist())
            if mask.any():
                samples.append(Sample(base + k, ids, mask, src_rows, src_pos))
        for sid, _ in docs:
            if sid not in stored:
                skipped[sid] = (
                    "no stored token in its windows"
                    if sid in in_windows
                    else "only in the unit's final partial window"
                    if o.concat
                    else f"shorter than the context size ({o.context_size} tokens)"
                )
        return self._planned(samples, skipped, 0, len(rows), windows=True)

    def _planned(self, samples: list[Sample], skipped, truncated, n_rows, *, windows: bool) -> Prepared:
        planned = batching.plan(
            [len(s) for s in samples], batch_tokens=self.options.batch_tokens, n_devices=self.n_devices
        )
        stored = [sum(samples[i].stored for row in pb.rows for i in row) for pb in planned]
        return Prepared(samples, skipped, truncated, n_rows, planned, stored, windows)


def cut_windows(
    docs: list[tuple[int, np.ndarray]], n: int, *, bos: int | None, sep: int | None, concat: bool
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Documents (row, token ids) -> windows of exactly n tokens: (ids int32, source rows int64, source
    positions int32, -1 for an inserted token). With concat, SAELens's concat_and_batch_sequences
    (begin_batch_token=bos, sequence_separator_token=sep, begin_sequence_token=None): every window starts with
    `bos` unless its first token already is it; between two documents in a window comes `sep` unless the next
    document starts with it; the final partial window is dropped. Without concat, each document is cut alone
    the same way (every window BOS-first), its final partial window dropped. n >= 2 when bos is given."""
    if bos is not None and n < 2:
        raise ValueError("a window of one token cannot start with BOS and hold text")
    out = []
    cur: list[tuple[int, int, int]] = []  # (token, row, position)

    def flush():
        if len(cur) == n:
            a = np.array(cur, dtype=np.int64)
            out.append((a[:, 0].astype(np.int32), a[:, 1], a[:, 2].astype(np.int32)))
        cur.clear()

    for row, ids in docs:
        if not concat:
            cur.clear()
        offset = 0
        while offset < len(ids):
            if not cur:  # a new window
                prefix = [(bos, row, -1)] if bos is not None and ids[offset] != bos else []
            else:
                prefix = [(sep, row, -1)] if sep is not None and ids[offset] != sep else []
            room = n - len(cur)
            prefix = prefix[:room]
            take = room - len(prefix)
            cur.extend(prefix)
            cur.extend((int(t), row, offset + j) for j, t in enumerate(ids[offset : offset + take]))
            offset += min(take, len(ids) - offset)
            if len(cur) == n:
                flush()
    return out
