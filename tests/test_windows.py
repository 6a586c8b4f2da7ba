"""Context windows: documents joined and cut into windows of exactly N tokens as SAELens does, each token
traced to its source row and position."""

import numpy as np
import pytest

from actfleet.worker.preparer import cut_windows

BOS, SEP = 1, 2


def docs(*lists):
    return [(row, np.array(ids, np.int32)) for row, ids in enumerate(lists)]


def test_concat_by_hand():
    got = cut_windows(docs([10, 11, 12], [20, 21, 22, 23, 24], [SEP, 30]), 4, bos=BOS, sep=SEP, concat=True)
    assert [w[0].tolist() for w in got] == [[BOS, 10, 11, 12], [BOS, 20, 21, 22], [BOS, 23, 24, SEP]]
    # the third document already starts with the separator (none is added); [30] stays in the partial window
    assert [w[1].tolist() for w in got] == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 2]]
    assert [w[2].tolist() for w in got] == [[-1, 0, 1, 2], [-1, 0, 1, 2], [-1, 3, 4, 0]]


def test_no_concat_cuts_each_document_alone_and_loses_no_full_window():
    got = cut_windows(docs([10], list(range(100, 107))), 3, bos=BOS, sep=SEP, concat=False)
    # document 0 is shorter than a window: no window; document 1: [BOS,100,101] [BOS,102,103] [BOS,104,105]
    assert [w[0].tolist() for w in got] == [[BOS, 100, 101], [BOS, 102, 103], [BOS, 104, 105]]
    assert all(w[1].tolist() == [1, 1, 1] for w in got)
    got = cut_windows(docs(list(range(100, 107))), 3, bos=None, sep=None, concat=False)
    assert [w[0].tolist() for w in got] == [[100, 101, 102], [103, 104, 105]]


@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("separator", [SEP, BOS, None])
def test_concat_matches_saelens(prepend_bos, separator):
    tb = pytest.importorskip("sae_lens.tokenization_and_batching")
    import torch

    rng = np.random.default_rng(7)
    lists = []
    for _ in range(40):
        ids = rng.integers(3, 50, size=int(rng.integers(1, 30))).tolist()
        if rng.random() < 0.2:
            ids[0] = int(rng.choice([BOS, SEP]))  # documents that already start with a special token
        lists.append(ids)
    for n in (2, 3, 5, 16):  # (n = 1 with a BOS-first window never ends in SAELens: actfleet refuses it)
        want = [
            t.tolist()
            for t in tb.concat_and_batch_sequences(
                iter(torch.tensor(x) for x in lists),
                n,
                begin_batch_token_id=BOS if prepend_bos else None,
                begin_sequence_token_id=None,
                sequence_separator_token_id=separator,
            )
        ]
        got = cut_windows(docs(*lists), n, bos=BOS if prepend_bos else None, sep=separator, concat=True)
        assert [w[0].tolist() for w in got] == want, n
        for ids, rows, pos in got:  # every original token is where its source says
            for t, r, p in zip(ids.tolist(), rows.tolist(), pos.tolist()):
                assert p == -1 or lists[r][p] == t
