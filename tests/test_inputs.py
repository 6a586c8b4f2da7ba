"""Dataset rows -> (sample_id, text, skip_reason): JSONL, Parquet, CSV; text, chat, ARC; bad rows counted."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actfleet.demo.tiny_model import make_tiny_model
from actfleet.errors import InputError
from actfleet.worker import sources
from tests.read_input import count_rows, pin, read_rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("m") / "m"))


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_jsonl_text_with_malformed_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "first"}),
            '{"text": "unterminated',
            json.dumps({"text": ""}),
            json.dumps({"other": 1}),
            json.dumps({"text": 5}),
            "[1, 2]",
            "",
            json.dumps({"text": "last"}),
        ],
    )
    rows = list(read_rows(path))
    assert rows == [
        (0, "first", None),
        (1, None, "bad JSON"),
        (2, None, "empty text"),
        (3, None, "missing field 'text'"),
        (4, None, "field 'text' is not a string"),
        (5, None, "not a JSON object"),
        (6, None, "blank line"),
        (7, "last", None),
    ]
    assert count_rows(pin(path)[0]) == 8
    assert list(read_rows(path, start=2, stop=4)) == rows[2:4]


def test_parquet_and_csv_give_the_same_rows(tmp_path):
    texts = ["alpha", "beta, with a comma", "", "delta\nwith a newline"]
    pq.write_table(pa.table({"body": texts, "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body", "n"])
        for i, t in enumerate(texts):
            w.writerow([t, i])
    want = [
        (0, "alpha", None),
        (1, "beta, with a comma", None),
        (2, None, "empty text"),
        (3, "delta\nwith a newline", None),
    ]
    for name in ("d.parquet", "d.csv"):
        path = str(tmp_path / name)
        assert list(read_rows(path, text_field="body")) == want
        assert count_rows(pin(path)[0], text_field="body") == 4


def test_csv_row_with_wrong_field_count_is_counted(tmp_path):
    (tmp_path / "d.csv").write_text("text,n\nok,1\ntoo,many,fields\nshort\n")
    assert list(read_rows(str(tmp_path / "d.csv"))) == [
        (0, "ok", None),
        (1, None, "malformed CSV row"),
        (2, None, "malformed CSV row"),
    ]


def test_chat_rendered_with_the_template(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
            json.dumps({"messages": [{"role": "user"}]}),
            json.dumps({"messages": "nope"}),
            json.dumps({"x": 1}),
        ],
    )
    rows = list(read_rows(path, format="chat", tokenizer=tokenizer))
    assert rows[0][1] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
    )
    assert [r[2] for r in rows[1:]] == ["field 'messages' is not a list of messages"] * 2 + ["missing field 'messages'"]


def test_arc_ids_enumerate_task_and_augmentation(tmp_path):
    task = {"train": [{"input": [[1, 2]], "output": [[2, 1]]}], "test": [{"input": [[3, 4]]}]}
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            json.dumps(task),
            json.dumps({"train": [{"input": [[11]], "output": [[1]]}], "test": [{"input": [[1]]}]}),
            json.dumps(task),
        ],
    )
    rows = list(read_rows(path, format="arc", arc_augmentations=2, arc_seed=1))
    assert [r[0] for r in rows] == list(range(9)) and count_rows(pin(path)[0], format="arc", arc_augmentations=2) == 9
    assert rows[0][1].startswith("Example 1\ninput 1x2\n0: 1 2")
    assert [r[2] for r in rows[3:6]] == ["invalid grid (train[0].input: cells must be integers 0-9)"] * 3
    # Same task at another index gets different augmentations, but augmentation 0 is the same prompt.
    assert rows[6][1] == rows[0][1]
    assert list(read_rows(path, format="arc", arc_augmentations=2, arc_seed=1, start=4, stop=7)) == rows[4:7]
    assert rows == list(read_rows(path, format="arc", arc_augmentations=2, arc_seed=1))


def test_unknown_or_missing_file_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="no such dataset file"):
        list(read_rows(str(tmp_path / "absent.jsonl")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="unknown dataset type"):
        list(read_rows(str(tmp_path / "d.txt")))


def test_fingerprint_is_sha256_of_bytes(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "a"})])
    assert sources.fingerprint(pin(path)[0]) == hashlib.sha256((tmp_path / "d.jsonl").read_bytes()).hexdigest()
