"""ARC tasks render as row-numbered grids under shape headers; augmentations are deterministic and valid."""

import numpy as np
import pytest

from actfleet.worker import arc


def render_task(task, *, seed: int = 0, task_index: int = 0, k: int = 0) -> str:
    pairs, tests = arc.parse_task(task)
    return arc.render(*arc.augment(pairs, tests, seed=seed, task_index=task_index, k=k))


TASK = {
    "train": [{"input": [[0, 1, 2], [3, 4, 5]], "output": [[5, 4, 3], [2, 1, 0]]}, {"input": [[7]], "output": [[8]]}],
    "test": [{"input": [[1, 0], [0, 1]]}],
}


def test_render_as_given():
    text = render_task(TASK)
    assert text == (
        "Example 1\ninput 2x3\n0: 0 1 2\n1: 3 4 5\noutput 2x3\n0: 5 4 3\n1: 2 1 0\n"
        "Example 2\ninput 1x1\n0: 7\noutput 1x1\n0: 8\n"
        "Test\ninput 2x2\n0: 1 0\n1: 0 1\noutput"
    )


def test_augmentations_are_deterministic_and_keep_structure():
    pairs, tests = arc.parse_task(TASK)
    seen = set()
    for k in range(1, 9):
        a = render_task(TASK, seed=7, task_index=3, k=k)
        assert a == render_task(TASK, seed=7, task_index=3, k=k)
        seen.add(a)
        new_pairs, new_tests = arc.augment(pairs, tests, seed=7, task_index=3, k=k)
        # Same multiset of shapes (up to transposition) and background 0 stays 0.
        assert sorted(sorted(p[0].shape) for p in new_pairs) == sorted(sorted(p[0].shape) for p in pairs)
        for i, o in new_pairs:
            assert (i == 0).sum() in ((pairs[0][0] == 0).sum(), (pairs[1][0] == 0).sum())
    assert len(seen) > 4  # augmentations differ from each other
    assert render_task(TASK, seed=8, task_index=3, k=1) != render_task(TASK, seed=7, task_index=3, k=1) or render_task(
        TASK, seed=8, task_index=3, k=2
    ) != render_task(TASK, seed=7, task_index=3, k=2)


def test_colour_permutation_is_a_bijection():
    grid = np.arange(10, dtype=np.int8).reshape(2, 5)
    task = {"train": [{"input": grid.tolist(), "output": grid.tolist()}], "test": [{"input": grid.tolist()}]}
    pairs, tests = arc.parse_task(task)
    for k in range(1, 6):
        ((i, o),) = arc.augment(pairs, tests, seed=1, task_index=0, k=k)[0]
        assert sorted(i.ravel().tolist()) == list(range(10)) and np.array_equal(i, o)


@pytest.mark.parametrize(
    "task,reason",
    [
        ({"train": [], "test": []}, "invalid task"),
        (
            {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]},
            "rows of different lengths",
        ),
        ({"train": [{"input": [[1, 12]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "integers 0-9"),
        ({"train": [{"input": [[1, True]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "integers 0-9"),
        ({"train": [{"input": [], "output": [[1]]}], "test": [{"input": [[1]]}]}, "non-empty"),
        ({"train": [{"input": [[0] * 31], "output": [[1]]}], "test": [{"input": [[1]]}]}, "larger than"),
        ([1, 2], "not an object"),
    ],
)
def test_invalid_tasks_name_the_problem(task, reason):
    with pytest.raises(arc.InvalidTask, match=reason):
        render_task(task)
