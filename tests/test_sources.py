"""Inputs of many files (directories, globs, compressed JSONL, save_to_disk, hub datasets offline): which files,
in which order, and reading any row range from the recorded seek index, equal to reading everything."""

import ast
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actfleet.errors import InputError
from actfleet.worker import inputs, pinning, sources
from tests.hub_layout import make_hub_dataset, offline
from tests.read_input import read_rows


def jsonl_bytes(rows):
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def describe_all(refs):
    files, local = pinning.pin_files(refs)
    copies = {f.path: pinning.plain_copy(f, p) for f, p in zip(files, local)}
    return files, lambda f: copies[f.path]


@pytest.fixture()
def data_dir(tmp_path):
    import zstandard

    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    a = [{"text": f"a{i}"} for i in range(5)]
    a[2] = b'{"text": "broken'  # counted, never fatal, in a compressed file too
    (d / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(a)))
    (d / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(jsonl_bytes({"text": f"b{i}"} for i in range(2300)))
    )
    pq.write_table(pa.table({"text": [f"c{i}" for i in range(10)]}), d / "sub" / "c.parquet", row_group_size=3)
    (d / "d.jsonl").write_bytes(jsonl_bytes({"text": f"d{i}"} for i in range(2500)))
    (d / ".hidden.jsonl").write_bytes(b'{"text": "never"}\n')
    (d / "notes.txt").write_text("not data")
    return d


def test_directory_and_glob_read_any_range_like_everything(tmp_path, data_dir):
    refs = sources.resolve(str(data_dir))
    assert [r.rsplit("/", 1)[-1] for r in refs] == ["a.jsonl.gz", "b.jsonl.zst", "d.jsonl", "c.parquet"]  # sorted paths
    assert sources.resolve(str(data_dir / "*.jsonl*")) == [r for r in refs if ".jsonl" in r]
    files, local = describe_all(refs)
    assert [f.rows for f in files] == [5, 2300, 2500, 10]
    assert files[1].index == [0, *files[1].index[1:]] and len(files[1].index) == 3  # offsets every 1000 rows
    assert files[3].index == [3, 3, 3, 1]  # parquet row groups
    # every record, each file read from its start (compressed JSONL streamed from the original file)
    everything = [r for f, ref in zip(files, refs) for r in inputs.head(f, Path(ref), f.rows)]
    assert len(everything) == 4815 and everything[2] == (None, "bad JSON")
    for lo, hi in [(0, 5), (3, 7), (1000, 1003), (2304, 2306), (4804, 4815), (4000, 4810), (0, 4815)]:
        assert list(inputs.records(files, lo, hi, local)) == everything[lo:hi], (lo, hi)


def test_jsonl_unit_is_read_from_its_offset(tmp_path):
    # A worker seeks to the recorded offset: bytes before it are not read. Splitting an early line in two in
    # place (same bytes count) after the index was made does not move the rows it returns from a later
    # offset; a reader that counts lines from row 0 would return each one row late.
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes({"text": f"r{i}"} for i in range(3000)))
    (f,), _ = pinning.pin_files([str(path)])
    data = path.read_bytes()
    old, new = b'{"text": "r10"}\n', b'{"a":1}\n{"b":2}\n'
    assert len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))
    assert [r["text"] for r, _ in inputs.read_range(f, path, 2000, 2003)] == ["r2000", "r2001", "r2002"]
    assert [r for r, _ in inputs.read_range(f, path, 9, 12)] == [{"text": "r9"}, {"a": 1}, {"b": 2}]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": [f"t{i}" for i in range(7)], "n": list(range(7))})
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    refs = sources.resolve(str(tmp_path / "one"))
    assert len(refs) > 1 and all(r.endswith(".arrow") for r in refs)  # several Arrow shards, in state.json order
    files, local = describe_all(refs)
    rows = list(inputs.read_source_rows(files, local, start=2, stop=6))
    assert rows == [(i, f"t{i}", None) for i in range(2, 6)]
    DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    refs = sources.resolve(str(tmp_path / "dict"), split="test")
    files, local = describe_all(refs)
    assert [r[1] for r in inputs.read_source_rows(files, local, start=0, stop=2)] == ["t0", "t1"]
    with pytest.raises(InputError, match="without split 'validation'.*train, test"):
        sources.resolve(str(tmp_path / "dict"), split="validation")


def test_hub_dataset_offline_pins_the_commit_and_reads_only_its_split(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = "c0ffee" + "0" * 34
    files = {
        "data/train-00000-of-00002.parquet": _parquet(["a", "b", "c"]),
        "data/train-00001-of-00002.parquet": _parquet(["d"]),
        "data/test-00000-of-00001.parquet": _parquet(["held out"]),
        "small/x.jsonl": jsonl_bytes([{"text": "s0"}, {"text": "s1"}]),
    }
    make_hub_dataset(cache, "org/tiny", commit, files)
    offline(monkeypatch, cache)
    refs = sources.resolve("org/tiny", split="train")
    assert refs == [f"hf://datasets/org/tiny@{commit}/data/train-0000{i}-of-00002.parquet" for i in (0, 1)]
    assert sources.resolve("org/tiny", split="train", revision=commit) == refs  # a commit is its own pin
    assert sources.resolve("org/tiny", split="train", subset="small") == [
        f"hf://datasets/org/tiny@{commit}/small/x.jsonl"
    ]
    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "data"))
    pinned, _ = pinning.pin_files(refs)
    rows = list(inputs.read_source_rows(pinned, pinning.pinned_file, start=1, stop=4))
    assert rows == [(1, "b", None), (2, "c", None), (3, "d", None)]
    # A file changed under the pinned commit (a corrupted hub cache) is refused by a worker that has no
    # checked copy yet (one that has keeps reading its copy: the pinned bytes).
    snap = cache / "datasets--org--tiny" / "snapshots" / commit
    (snap / "data/train-00001-of-00002.parquet").write_bytes(_parquet(["e"]))
    assert list(inputs.read_source_rows(pinned, pinning.pinned_file, start=3, stop=4)) == [(3, "d", None)]
    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "another-worker"))
    with pytest.raises(InputError, match="changed since prepare"):
        list(inputs.read_source_rows(pinned, pinning.pinned_file, start=3, stop=4))
    for kwargs, message in [
        ({"split": "validation"}, "no split 'validation' \\(it has train, test\\)"),
        ({"subset": "nope"}, "no subset 'nope'; pass --subset, one of default, small"),
        ({"revision": "v2"}, "cannot resolve the hub dataset at revision 'v2'"),
    ]:
        with pytest.raises(InputError, match=message):
            sources.resolve("org/tiny", **{"split": "train", **kwargs})
    with pytest.raises(InputError, match="no such dataset file or directory"):
        sources.resolve(str(tmp_path / "absent.jsonl"))


def _parquet(texts):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue().to_pybytes()


def test_a_field_no_row_has_names_the_fields_present(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes([{"body": "x", "id": 1}, b"garbage", {"body": "y", "id": 2}]))
    (f,), (local,) = pinning.pin_files([str(path)])
    with pytest.raises(
        InputError, match="--text-field text: no row of d.jsonl has field 'text'; its rows have 'body', 'id'"
    ):
        inputs.check_field(inputs.head(f, local, 1000), what="d.jsonl")
    inputs.check_field(inputs.head(f, local, 1000), text_field="body")
    with pytest.raises(InputError, match="--tokens-field input_ids"):
        inputs.check_field(inputs.head(f, local, 1000), tokens_field="input_ids")


def test_tokens_field_rows_and_bad_ids(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(jsonl_bytes([{"input_ids": [1, 2, 3]}, {"other": 1}, {"input_ids": []}, {"input_ids": [4, "x"]}]))
    rows = read_rows(str(path), tokens_field="input_ids")
    assert [next(rows), next(rows), next(rows)] == [
        (0, [1, 2, 3], None),
        (1, None, "missing field 'input_ids'"),
        (2, None, "empty text"),
    ]
    with pytest.raises(InputError, match="row 3: field 'input_ids' is not a list of token ids"):
        next(rows)


def test_sources_inputs_pinning_import_one_way():
    """sources (which files) <- inputs (reading local copies) <- pinning (which copies): no module imports one
    below it, at the top or inside a function."""
    worker = Path(__file__).resolve().parents[1] / "worker"
    order = ["sources", "inputs", "pinning"]
    for i, name in enumerate(order):
        tree = ast.parse((worker / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module.rsplit(".", 1)[-1]} | {
                    f"{node.module}.{a.name}".rsplit(".", 1)[-1] for a in node.names
                }
            elif isinstance(node, ast.Import):
                imported |= {a.name.rsplit(".", 1)[-1] for a in node.names}
        assert not imported & set(order[i + 1 :]), (name, imported & set(order[i + 1 :]))


@pytest.mark.parametrize(
    "ref, message",
    [
        ("gs://", "no bucket"),
        ("gs://b/../d.jsonl", '".." is not allowed'),
        ("gs://b/", "looks like gs://bucket/path/data.jsonl"),
        ("gs://b/d.txt", "unknown dataset type"),
    ],
)
def test_a_bad_gcs_reference_is_refused_before_any_request(ref, message):
    with pytest.raises(InputError, match=message) as e:
        sources.resolve(ref)
    assert ref in str(e.value)
