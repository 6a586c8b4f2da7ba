"""Command-line flags shared by `extract` and `prepare`: which rows are read and how they become samples.

`extract` shows JobOptions' defaults; `prepare` passes None for a flag not given, so fleet.toml's [job] value
(or the default) stands. Each flag maps to the JobOptions field of the same name (actfleet/job_options.py).
"""

from __future__ import annotations

import click

from actfleet.job_options import DEFAULTS, SEPARATORS

POSITIONS_HELP = ("Which tokens of each sample are stored: all; non-special (all but BOS/EOS/pad and other special "
                  "tokens); last (the final token only).")
SHARD_MB_HELP = "Approximate shard size in MiB (2**20 bytes)."

# (flag, JobOptions field, click type, help)
READING = (
    ("--split", "split", str, "Hub dataset or saved DatasetDict: the split to read."),
    ("--subset", "subset", str, "Hub dataset: the subset (config name in its dataset card)."),
    ("--dataset-revision", "dataset_revision", str,
     "Hub dataset: branch, tag or commit; prepare pins the commit it resolves to. (--revision is the model's.)"),
    ("--max-rows", "max_rows", click.IntRange(min=0), "Read only the first N rows (0 = all): a test-size run."),
    ("--tokens-field", "tokens_field", str,
     "Pre-tokenized input: the field holding each row's token ids (e.g. input_ids); no tokenizer is run."),
    ("--context-size", "context_size", click.IntRange(min=0),
     "Cut documents into windows of exactly N tokens, SAELens-style (0 = one sample per document)."),
    ("--separator", "separator", click.Choice(SEPARATORS),
     "With --context-size: the token between documents joined in a window."),
)


def reading_options(show_defaults: bool):
    """Decorator adding the READING flags plus --prepend-bos/--no-prepend-bos and --concat/--no-concat."""

    def deco(f):
        f = click.option("--concat/--no-concat", "concat", default=DEFAULTS.concat if show_defaults else None,
                         show_default=show_defaults,
                         help="With --context-size: join documents into windows (--no-concat: each document is "
                              "cut into its own windows).")(f)
        f = click.option("--prepend-bos/--no-prepend-bos", "prepend_bos",
                         default=DEFAULTS.prepend_bos if show_defaults else None, show_default=show_defaults,
                         help="With --context-size: start every window with the BOS token.")(f)
        for flag, name, typ, text in reversed(READING):
            f = click.option(flag, name, type=typ, default=getattr(DEFAULTS, name) if show_defaults else None,
                             show_default=show_defaults, help=text)(f)
        return f

    return deco


READING_NAMES = tuple(name for _, name, _, _ in READING) + ("prepend_bos", "concat")
