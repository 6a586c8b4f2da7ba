"""Reading a job's data files from local copies: each file's rows and seek index (prepare), any range of its
records (workers), and the rows they render to: `(sample_id, text, None)`, or `(sample_id, None, reason)` for a
bad row. Which files make up an input is actfleet.worker.sources; which local copies are read (the pinned bytes)
is actfleet.worker.pinning. This module reads only the local files it is given.

Files: JSONL (one JSON object per line; also .jsonl.gz, .jsonl.zst), Parquet, CSV and `datasets` Arrow files.
What prepare records per file so that a worker reads a range without reading what precedes it (`DataFile.index`):
  jsonl       the byte offset of every INDEX_EVERY-th line: a unit seeks, skips < INDEX_EVERY lines unparsed;
  jsonl.gz    the same offsets, in the decompressed stream: compressed streams cannot seek, so a worker
  jsonl.zst   reads a decompressed copy (made once per machine in the data cache) and seeks in that;
  parquet     rows per row group: a unit reads only the row groups that hold its rows;
  arrow       nothing (an Arrow file is memory-mapped through `datasets`; slicing it is free);
  csv         nothing: quoted newlines make byte offsets unsafe, so CSV is still read from its start.

Formats:
  text  the string in `text_field` (or, with `tokens_field`, the list of token ids in that field);
  chat  the list of {"role", "content"} in `messages_field`, rendered with the tokenizer's chat template;
  arc   an ARC task per row (the row itself, or a JSON object in `text_field`), rendered by actfleet.worker.arc;
        with `arc_augmentations` A, task t yields sample ids t*(A+1) .. t*(A+1)+A (augmentation 0 = as given).

Every physical row is a sample id, bad or not, so ids are stable and the work queue can split the input by
id. Malformed rows (bad JSON, missing or non-string field, empty text, invalid messages or grid) are
returned with a reason, never raised (a tokens field holding something other than token ids is bad input and
raises: it means the wrong field, not one bad row). JSONL, Parquet and CSV are read here with the standard
library and pyarrow rather than `datasets`: `datasets` aborts the whole file on one bad JSON line and copies the
file into its Arrow cache, while we must count bad lines and stream (`datasets` does resolve hub datasets, in
sources, and memory-maps the Arrow files of save_to_disk directories, here).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from actfleet.errors import InputError
from actfleet.worker import arc
from actfleet.worker.samples import Row
from actfleet.worker.sources import DataFile

FORMATS = ("text", "chat", "arc")
INDEX_EVERY = 1000  # JSONL rows between recorded byte offsets: a unit parses at most this many extra lines
Record = tuple[Any, "str | None"]  # (dict | None, reason a row is bad | None), one per physical row


# ----------------------------------------------------------------------------------------------------
# Records of one local file
# ----------------------------------------------------------------------------------------------------


def parse_jsonl_line(line: bytes) -> Record:
    """One JSONL line -> (record, None) or (None, reason): a bad line is counted, never fatal."""
    if not line.strip():
        return None, "blank line"
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "bad JSON"
    return (rec, None) if isinstance(rec, dict) else (None, "not a JSON object")


def csv_records(path: Path) -> Iterator[Record]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        for rec in reader:
            if None in rec or any(v is None for v in rec.values()):  # too many or too few fields
                yield None, "malformed CSV row"
            else:
                yield rec, None


def open_text_stream(local: Path, kind: str):
    """A binary stream of the decompressed bytes."""
    if kind == "jsonl.gz":
        return gzip.open(local, "rb")
    if kind == "jsonl.zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(local, "rb"), closefd=True)
    return open(local, "rb")


def describe(path: str, local: Path, kind: str, sha256: str, generation: int | None = None) -> DataFile:
    """Count the rows of a local copy and build its seek index, in one pass over its bytes (for compressed
    JSONL, hashing the decompressed bytes in the same pass: the worker's decompressed copy is checked
    against that hash)."""
    index: list[int] = []
    plain = ""
    if kind.startswith("jsonl"):
        rows = offset = 0
        digest = hashlib.sha256() if kind != "jsonl" else None
        with open_text_stream(local, kind) as raw:
            stream = raw if kind == "jsonl" else io.BufferedReader(raw, 1 << 20)
            for line in stream:
                if rows % INDEX_EVERY == 0:
                    index.append(offset)
                offset += len(line)
                rows += 1
                if digest is not None:
                    digest.update(line)
        plain = digest.hexdigest() if digest is not None else ""
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(local).metadata
        except Exception as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        index = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        rows = meta.num_rows
    elif kind == "arrow":
        rows = _arrow_table(local, path).num_rows
    else:
        rows = sum(1 for _ in csv_records(local))
    return DataFile(
        path=path, kind=kind, rows=rows, sha256=sha256, generation=generation, index=index, plain_sha256=plain
    )


def read_range(f: DataFile, local: Path, lo: int, hi: int) -> Iterator[Record]:
    """Records [lo, hi) of one file from its local copy (compressed JSONL: its decompressed copy, which the
    index's offsets address)."""
    if f.kind.startswith("jsonl"):
        k = lo // INDEX_EVERY if f.index else 0
        with open(local, "rb") as fh:
            fh.seek(f.index[k] if f.index else 0)
            row = k * INDEX_EVERY if f.index else 0
            for line in fh:
                if row >= hi:
                    return
                if row >= lo:
                    yield parse_jsonl_line(line)
                row += 1
        return
    if f.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(local)
        sizes = f.index or [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        base = 0
        for g, n in enumerate(sizes):
            if base + n > lo and base < hi:
                table = pf.read_row_group(g)
                a, b = max(lo - base, 0), min(hi - base, n)
                for rec in table.slice(a, b - a).to_pylist():
                    yield rec, None
            base += n
        return
    if f.kind == "arrow":
        table = _arrow_table(local, f.path)
        for rec in table.slice(lo, hi - lo).to_pylist():
            yield rec, None
        return
    yield from islice(csv_records(local), lo, hi)


def head(f: DataFile, local: Path, n: int) -> Iterator[Record]:
    """The first n records of a file, read from its start (compressed JSONL is streamed, not decompressed
    to disk): for checks at prepare time."""
    if f.kind.startswith("jsonl"):
        with open_text_stream(local, f.kind) as raw:
            for line in islice(io.BufferedReader(raw, 1 << 20) if f.kind != "jsonl" else raw, n):
                yield parse_jsonl_line(line)
        return
    yield from read_range(f, local, 0, min(n, f.rows))


def _arrow_table(local: Path, path: str):
    """A `datasets` Arrow file (save_to_disk's data-*.arrow), memory-mapped: slicing reads only the slice."""
    from datasets import Dataset

    try:
        return Dataset.from_file(str(local)).data.table
    except Exception as e:
        raise InputError(f"{path}: not a readable Arrow dataset file ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------
# Records [start, stop) across a job's files
# ----------------------------------------------------------------------------------------------------


def segments(files: list[DataFile], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(file number, first row in it, stop row in it) covering the job's rows [start, stop)."""
    out, base = [], 0
    for i, f in enumerate(files):
        lo, hi = max(start, base), min(stop, base + f.rows)
        if lo < hi:
            out.append((i, lo - base, hi - base))
        base += f.rows
    return out


def records(files: list[DataFile], start: int, stop: int, local: Callable[[DataFile], Path]) -> Iterator[Record]:
    """One (record, reason) per row in [start, stop), reading each file only around its range. `local` gives
    the local copy of a file (a pinned one for workers; for compressed JSONL, its decompressed copy)."""
    for i, lo, hi in segments(files, start, stop):
        f = files[i]
        yield from read_range(f, local(f), lo, hi)


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def render_text(rec: dict, field: str) -> tuple[str | None, str | None]:
    if field not in rec or rec[field] is None:
        return None, f"missing field {field!r}"
    value = rec[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is not a string"
    if not value.strip():
        return None, "empty text"
    return value, None


def render_chat(rec: dict, field: str, tokenizer) -> tuple[str | None, str | None]:
    messages = rec.get(field)
    if isinstance(messages, str):  # CSV cells, or JSON stored as a string
        try:
            messages = json.loads(messages)
        except ValueError:
            return None, f"field {field!r} is not a list of messages"
    if messages is None:
        return None, f"missing field {field!r}"
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        return None, f"field {field!r} is not a list of messages"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False
        )
    except Exception as e:  # jinja raises on roles/orders a template rejects
        return None, f"chat template rejected the messages ({type(e).__name__})"
    return (text, None) if text.strip() else (None, "empty text")


def _arc_task(rec: dict, field: str):
    if "train" in rec or "test" in rec:
        return rec
    value = rec.get(field)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise arc.InvalidTask("invalid task (not JSON)") from None
    if value is None:
        raise arc.InvalidTask('invalid task (no "train"/"test")')
    return value


def render_tokens(rec: dict, field: str, index: int) -> tuple["list[int] | None", str | None]:
    """A pre-tokenized row: the list of token ids in `field`. A missing field is a skipped row; a field that is
    not a list of non-negative integers is bad input (InputError naming the row and field)."""
    if field not in rec or rec[field] is None:
        return None, f"missing field {field!r}"
    value = rec[field]
    if hasattr(value, "tolist"):  # numpy arrays from Arrow
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise InputError(f"row {index}: field {field!r} is not a list of token ids (non-negative integers)")
    return (list(value), None) if value else (None, "empty text")


def read_source_rows(files, local, *, start: int, stop: int, **options) -> Iterator[Row]:
    """Rows (sample id, text or token ids, reason) with sample ids in [start, stop), in order, over a job's data
    files (actfleet.worker.sources.DataFile), reading only around the range: `local(file)` gives each file's
    local copy (actfleet.worker.pinning.pinned_file for a worker). Every id in range appears exactly once.
    Options: those of `render_rows`."""
    per = options.get("arc_augmentations", 0) + 1 if options.get("format", "text") == "arc" else 1
    first, last = start // per, -(-stop // per)
    recs = records(files, first, last, local)
    return render_rows(
        ((first + i, rec, reason) for i, (rec, reason) in enumerate(recs)), start=start, stop=stop, **options
    )


def render_rows(
    recs,
    *,
    format: str = "text",
    text_field: str = "text",
    messages_field: str = "messages",
    tokens_field: str = "",
    tokenizer=None,
    arc_augmentations: int = 0,
    arc_seed: int = 0,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Row]:
    """(record index, record, reason) -> rows (sample id, text or token ids, reason) for ids in [start, stop)."""
    if format not in FORMATS:
        raise InputError(f"format {format!r}: use one of {', '.join(FORMATS)}")
    if format == "chat" and tokenizer is None:
        raise ValueError("format chat needs a tokenizer (for its chat template)")
    per = arc_augmentations + 1 if format == "arc" else 1
    for index, rec, reason in recs:
        first = index * per
        if stop is not None and first >= stop:
            return
        if first + per <= start:
            continue
        if format == "arc":
            parsed = None
            if reason is None:
                try:
                    parsed = arc.parse_task(_arc_task(rec, text_field))
                except arc.InvalidTask as e:
                    reason = str(e)
            for k in range(per):
                sid = first + k
                if sid < start or (stop is not None and sid >= stop):
                    continue
                if reason:
                    yield sid, None, reason
                else:
                    yield sid, arc.render(*arc.augment(*parsed, seed=arc_seed, task_index=index, k=k)), None
            continue
        if reason is None:
            if tokens_field:
                text, reason = render_tokens(rec, tokens_field, first)
            elif format == "text":
                text, reason = render_text(rec, text_field)
            else:
                text, reason = render_chat(rec, messages_field, tokenizer)
        yield (first, None, reason) if reason else (first, text, None)


def check_field(
    recs,
    *,
    format: str = "text",
    text_field: str = "text",
    messages_field: str = "messages",
    tokens_field: str = "",
    sample: int = 1000,
    what: str = "the dataset",
    **_ignored,
) -> None:
    """InputError when none of the first `sample` records has the field the options read (a misspelt
    --text-field would otherwise run and store nothing), naming the fields that are there."""
    if format == "arc":
        return
    field = tokens_field or (text_field if format == "text" else messages_field)
    seen: dict[str, None] = {}
    for n, (rec, _reason) in enumerate(recs):
        if n >= sample:
            break
        if isinstance(rec, dict):
            if field in rec:
                return
            seen.update(dict.fromkeys(rec))
    if seen:
        flag = "--tokens-field" if tokens_field else ("--text-field" if format == "text" else "--messages-field")
        raise InputError(
            f"{flag} {field}: no row of {what} has field {field!r}; its rows have "
            f"{', '.join(repr(k) for k in list(seen)[:20])}"
        )
