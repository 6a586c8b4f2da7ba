"""ARC tasks as prompts, with deterministic augmentations.

A task is `{"train": [{"input": grid, "output": grid}, ...], "test": [{"input": grid}, ...]}` with grids of
integers 0-9. The prompt writes each grid under a shape header ("input 3x4" = 3 rows, 4 columns), one row
per line, prefixed by its row number:

    Example 1
    input 2x3
    0: 0 1 2
    1: 3 4 5
    output 2x3
    ...
    Test
    input 2x2
    0: 7 7
    1: 0 7
    output

Augmentation k of a task (k >= 1; k = 0 is the task as given) applies one of the 8 rotations/flips, a
permutation of the colours 1-9 (0, the background, stays) and a shuffled order of the train pairs, all drawn
from a generator seeded with (seed, task index, k): the same inputs always give the same prompts.
"""

from __future__ import annotations

import numpy as np

MAX_SIDE = 30


class InvalidTask(ValueError):
    """The row is not a well-formed ARC task; the message is the skip reason."""


def check_grid(grid, where: str) -> np.ndarray:
    if not isinstance(grid, list) or not grid or not all(isinstance(r, list) and r for r in grid):
        raise InvalidTask(f"invalid grid ({where}: not a non-empty list of non-empty rows)")
    width = len(grid[0])
    if any(len(r) != width for r in grid):
        raise InvalidTask(f"invalid grid ({where}: rows of different lengths)")
    if len(grid) > MAX_SIDE or width > MAX_SIDE:
        raise InvalidTask(f"invalid grid ({where}: larger than {MAX_SIDE}x{MAX_SIDE})")
    if not all(type(v) is int and 0 <= v <= 9 for r in grid for v in r):
        raise InvalidTask(f"invalid grid ({where}: cells must be integers 0-9)")
    return np.array(grid, dtype=np.int8)


def parse_task(task) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """(train pairs, test inputs) as arrays; InvalidTask with a reason otherwise."""
    if not isinstance(task, dict):
        raise InvalidTask("invalid task (not an object)")
    train, test = task.get("train"), task.get("test")
    if not isinstance(train, list) or not isinstance(test, list) or not test:
        raise InvalidTask('invalid task (needs a "train" list and a non-empty "test" list)')
    pairs = []
    for i, pair in enumerate(train):
        if not isinstance(pair, dict):
            raise InvalidTask(f"invalid task (train[{i}] is not an object)")
        pairs.append(
            (check_grid(pair.get("input"), f"train[{i}].input"), check_grid(pair.get("output"), f"train[{i}].output"))
        )
    tests = []
    for i, t in enumerate(test):
        if not isinstance(t, dict):
            raise InvalidTask(f"invalid task (test[{i}] is not an object)")
        tests.append(check_grid(t.get("input"), f"test[{i}].input"))
    return pairs, tests


def render_grid(grid: np.ndarray, label: str) -> str:
    lines = [f"{label} {grid.shape[0]}x{grid.shape[1]}"]
    lines += [f"{i}: " + " ".join(str(int(v)) for v in row) for i, row in enumerate(grid)]
    return "\n".join(lines)


def render(pairs, tests) -> str:
    parts = []
    for i, (inp, out) in enumerate(pairs, start=1):
        parts.append(f"Example {i}\n{render_grid(inp, 'input')}\n{render_grid(out, 'output')}")
    for i, inp in enumerate(tests, start=1):
        title = "Test" if len(tests) == 1 else f"Test {i}"
        parts.append(f"{title}\n{render_grid(inp, 'input')}\noutput")
    return "\n".join(parts)


def augment(pairs, tests, *, seed: int, task_index: int, k: int):
    """Augmentation k (0 = identity) of a parsed task."""
    if k == 0:
        return pairs, tests
    rng = np.random.default_rng([seed, task_index, k])
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    colours = np.concatenate([[0], 1 + rng.permutation(9)]).astype(np.int8)
    order = rng.permutation(len(pairs))

    def tf(g: np.ndarray) -> np.ndarray:
        g = np.rot90(g, turns)
        return colours[np.fliplr(g) if flip else g]

    return [(tf(pairs[i][0]), tf(pairs[i][1])) for i in order], [tf(t) for t in tests]
