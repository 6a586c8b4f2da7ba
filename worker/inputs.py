"""Dataset rows -> rendered texts: `(sample_id, text, None)`, or `(sample_id, None, reason)` for a bad row.

Files: JSONL (one JSON object per line; also .jsonl.gz, .jsonl.zst), Parquet, CSV and `datasets` Arrow files;
which files make up an input, and reading a range of them cheaply, is actfleet.worker.sources. Formats:
  text  the string in `text_field` (or, with `tokens_field`, the list of token ids in that field);
  chat  the list of {"role", "content"} in `messages_field`, rendered with the tokenizer's chat template;
  arc   an ARC task per row (the row itself, or a JSON object in `text_field`), rendered by actfleet.worker.arc;
        with `arc_augmentations` A, task t yields sample ids t*(A+1) .. t*(A+1)+A (augmentation 0 = as given).

Every physical row is a sample id, bad or not, so ids are stable and the work queue can split the file by
id. Malformed rows (bad JSON, missing or non-string field, empty text, invalid messages or grid) are
returned with a reason, never raised (a tokens field holding something other than token ids is bad input and
raises: it means the wrong field, not one bad row). JSONL, Parquet and CSV are read here with the standard library and
pyarrow rather than `datasets`: `datasets` aborts the whole file on one bad JSON line and copies the file
into its Arrow cache, while we must count bad lines and stream (`datasets` does resolve hub datasets and
memory-map the Arrow files of save_to_disk directories, in sources).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from actfleet.errors import InputError
from actfleet.hashing import sha256_file
from actfleet.worker import arc
from actfleet.worker.samples import Row

FORMATS = ("text", "chat", "arc")


def file_kind(path: str) -> str:
    from actfleet.worker.sources import file_kind as kind

    return kind(path)


def local_file(path: str) -> Path:
    """A local path for `path`; a gs:// object is downloaded once per object generation into the cache, so
    a replaced object is fetched again instead of read stale. (Fleet workers read the job's pinned bytes
    through worker/pinning.py instead.)"""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not path.startswith("gs://"):
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{path}: no such dataset file")
        return p
    from google.cloud import storage

    bucket, _, name = path[len("gs://"):].partition("/")
    from actfleet.worker.pinning import data_cache

    try:
        blob = storage.Client().bucket(bucket).get_blob(name)
        if blob is None:
            raise InputError(f"{path}: no such dataset object")
        dest = data_cache() / hashlib.sha256(path.encode()).hexdigest()[:16] / str(blob.generation) / Path(name).name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            blob.download_to_filename(str(tmp))  # this generation: a replacement since the lookup fails it
            tmp.replace(dest)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot download the dataset ({type(e).__name__}: {e})") from None
    return dest


def fingerprint(path: str) -> str:
    """sha256 of the dataset file's bytes."""
    return sha256_file(local_file(path))


# ----------------------------------------------------------------------------------------------------
# Records: (record index, dict | None, reason | None), one per physical row
# ----------------------------------------------------------------------------------------------------


def parse_jsonl_line(line: bytes) -> tuple[Any, str | None]:
    """One JSONL line -> (record, None) or (None, reason): a bad line is counted, never fatal."""
    if not line.strip():
        return None, "blank line"
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "bad JSON"
    return (rec, None) if isinstance(rec, dict) else (None, "not a JSON object")


def _jsonl_records(path: Path) -> Iterator[tuple[Any, str | None]]:
    with open(path, "rb") as f:
        for line in f:
            yield parse_jsonl_line(line)


def _parquet_records(path: Path) -> Iterator[tuple[Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield rec, None


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None


def _csv_records(path: Path) -> Iterator[tuple[Any, str | None]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        for rec in reader:
            if None in rec or any(v is None for v in rec.values()):  # too many or too few fields
                yield None, "malformed CSV row"
            else:
                yield rec, None


def records(path: str) -> Iterator[tuple[Any, str | None]]:
    """Every record of one dataset file, in order (compressed JSONL and Arrow files included)."""
    from actfleet.worker import sources

    kind = file_kind(path)
    local = local_file(path)
    if kind == "jsonl":
        return _jsonl_records(local)
    if kind == "parquet":
        return _parquet_records(local)
    if kind == "csv":
        return _csv_records(local)
    if kind == "arrow":
        return sources.read_range(sources.DataFile(path, kind, 1 << 62, ""), local, 0, 1 << 62)
    return _compressed_jsonl_records(local, kind)


def _compressed_jsonl_records(local: Path, kind: str) -> Iterator[tuple[Any, str | None]]:
    import io

    from actfleet.worker import sources

    with sources.open_text_stream(local, kind) as raw:
        for line in io.BufferedReader(raw, 1 << 20):
            yield parse_jsonl_line(line)


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
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        return None, f"field {field!r} is not a list of messages"
    try:
        text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                             tokenize=False)
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
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in value):
        raise InputError(f"row {index}: field {field!r} is not a list of token ids (non-negative integers)")
    return (list(value), None) if value else (None, "empty text")


def read_rows(path: str, **options) -> Iterator[Row]:
    """Rows of one dataset file with sample ids in [start, stop), in order; every id in range appears exactly
    once. Options: those of `render_rows`."""
    return render_rows(((i, rec, reason) for i, (rec, reason) in enumerate(records(path))), **options)


def read_source_rows(files, local, *, start: int, stop: int, **options) -> Iterator[Row]:
    """`read_rows` over a job's data files (actfleet.worker.sources.DataFile), reading only around
    [start, stop): `local(file)` gives each file's local copy."""
    from actfleet.worker import sources

    per = options.get("arc_augmentations", 0) + 1 if options.get("format", "text") == "arc" else 1
    first, last = start // per, -(-stop // per)
    recs = sources.records(files, first, last, local)
    return render_rows(((first + i, rec, reason) for i, (rec, reason) in enumerate(recs)), start=start, stop=stop,
                       **options)


def render_rows(recs, *, format: str = "text", text_field: str = "text", messages_field: str = "messages",
                tokens_field: str = "", tokenizer=None, arc_augmentations: int = 0, arc_seed: int = 0,
                start: int = 0, stop: int | None = None) -> Iterator[Row]:
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


def check_field(recs, *, format: str = "text", text_field: str = "text", messages_field: str = "messages",
                tokens_field: str = "", sample: int = 1000, what: str = "the dataset", **_ignored) -> None:
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
        raise InputError(f"{flag} {field}: no row of {what} has field {field!r}; its rows have "
                         f"{', '.join(repr(k) for k in list(seen)[:20])}")


def count_rows(path: str, *, format: str = "text", arc_augmentations: int = 0, **_reading) -> int:
    """How many sample ids read_rows yields for the whole file (bad rows included)."""
    from actfleet.worker import sources

    kind, local = file_kind(path), local_file(path)
    n = sources.describe(path, local, kind, "").rows  # JSONL: lines are rows, good or bad: none is parsed
    return n * (arc_augmentations + 1 if format == "arc" else 1)
