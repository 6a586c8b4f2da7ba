"""The options a job pins, defined once: the option table (`TABLE`: name, type, default, bounds or choices,
help, where it applies), and `JobOptions`, the options a job pins, validated from that table.

Everything that changes the stored bits or rows is a JobOptions field. fleet.toml's [job] table
(actfleet.config) produces one, `actfleet prepare` writes one into job.json (actfleet.work_queue.JobSpec),
`actfleet extract` builds one from its flags, and the engine (actfleet.worker.engine.Engine) runs with one.
fleet.toml's [job] schema, the flags of `extract` and `prepare` (actfleet.worker.commands.flags) and the shard
metadata strings (actfleet.worker.shards.job_metadata) are generated from the table.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from actfleet import sites as site_names

FORMATS = ("text", "chat", "arc")
POSITIONS = ("all", "non-special", "last")
LONG_INPUTS = ("skip", "truncate")
DTYPES = ("bfloat16", "float32")
SEPARATORS = ("eos", "bos", "none")  # the token between concatenated documents in a context window
STATS = ("moments", "gram", "none")  # per-unit activation statistics (actfleet.worker.stats)

# Job settings that are not extraction options (job.json pins unit_rows separately; leases are per worker).
DEFAULT_UNIT_ROWS = 1000
DEFAULT_LEASE_SECONDS = 300


# ----------------------------------------------------------------------------------------------------
# The option table: every job option once, with its type, default, bounds or choices, help and where it
# applies. fleet.toml's [job] schema (actfleet.config), the Click flags of `extract` and `prepare`
# (actfleet.worker.commands.flags), JobOptions' validation, job.json's options and the shard metadata strings
# (actfleet.worker.shards.job_metadata) are all derived from it, so a bound is enforced identically everywhere.
# ----------------------------------------------------------------------------------------------------

TOML, PREPARE, EXTRACT, JOB, SHARD = "toml", "prepare", "extract", "job", "shard"
"""Where an option applies: fleet.toml's [job] table; a flag of `actfleet prepare` / `actfleet extract`;
a JobOptions field (so job.json's options and the engine); a shard metadata string."""


class BadValue(ValueError):
    """Raised by Option.check with the 'what is allowed' half of a message (each caller names the culprit)."""


@dataclass(frozen=True)
class Option:
    name: str
    type: str  # int | number | str | bool | choice | sites | layers | store
    default: Any  # the JobOptions / fleet.toml default
    help: str = ""
    where: tuple[str, ...] = (TOML, PREPARE, EXTRACT, JOB)
    lo: float | None = None  # int / number: inclusive bounds
    hi: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None  # str: the whole value must match
    allowed: str = ""  # str: what the pattern allows, in words
    empty_ok: bool = False  # str: "" is allowed whatever the pattern
    required: bool = False  # fleet.toml must set it
    flag_default: Any = None  # extract's flag default when it is not `default` (None: `default`)

    @property
    def flag(self) -> str:
        """The command-line spelling, e.g. --shard-mb (a bool also gets --no-...)."""
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The value (normalised) or BadValue saying what is allowed. Sites, layers and store are checked by
        actfleet.config (their fleet.toml forms differ from their flag forms)."""
        t = self.type
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_range(value):
                raise BadValue("must be an integer" + _range(self.lo, self.hi))
        elif t == "number":
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value != value
                or not self._in_range(value)
            ):
                raise BadValue("must be a number" + _range(self.lo, self.hi))
        elif t == "choice":
            if value not in self.choices:
                raise BadValue("use one of " + ", ".join(self.choices))
        elif t == "bool":
            if not isinstance(value, bool):
                raise BadValue("must be true or false")
        elif t == "str":
            if not isinstance(value, str):
                raise BadValue("must be a string" + (f" ({self.allowed})" if self.allowed else ""))
            if not (value == "" and self.empty_ok) and self.pattern and not re.fullmatch(self.pattern, value):
                raise BadValue(f"must be {self.allowed}")
        return value

    def _in_range(self, v) -> bool:
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


_ALL = (TOML, PREPARE, EXTRACT, JOB)
_REVISION = r"[A-Za-z0-9._/-]+"
_FIELD = r"\S+"
TABLE: tuple[Option, ...] = (
    # Not extraction options: which job, where, what input, how it is cut (job.json pins these separately).
    Option(
        "name",
        "str",
        "default",
        where=(TOML,),
        pattern=r"[a-z0-9][a-z0-9._-]{0,62}",
        allowed="a job name (a-z, 0-9, ., _, -; up to 63)",
    ),
    Option("store", "store", "", where=(TOML,)),
    Option(
        "model",
        "str",
        "",
        "Model: a local dir, a gs:// prefix or a hub id (HF format, safetensors).",
        pattern=r"\S+",
        allowed="a local path, gs://bucket/prefix or hub id",
        empty_ok=True,
        required=True,
    ),
    Option(
        "revision",
        "str",
        "main",
        "Hub revision (branch, tag or commit) of the model.",
        pattern=_REVISION,
        allowed="a hub revision",
    ),
    Option(
        "input",
        "str",
        "",
        "Dataset: a file (.jsonl[.gz|.zst], .parquet, .csv, .arrow; local or gs://), a directory or glob of "
        "them, a save_to_disk directory, or a hub dataset id (with --split, --subset, --dataset-revision).",
        where=(TOML, PREPARE, EXTRACT),
        pattern=r"\S+",
        allowed="a dataset file, directory, glob, gs:// URL or hub dataset id",
        required=True,
    ),
    # Which rows (actfleet.worker.sources).
    Option(
        "split",
        "str",
        "train",
        "Hub dataset or saved DatasetDict: the split to read.",
        pattern=r"[A-Za-z0-9_.-]+",
        allowed="a split name",
    ),
    Option(
        "subset",
        "str",
        "",
        "Hub dataset: the subset (config name in its dataset card).",
        pattern=r"[A-Za-z0-9_.-]+",
        allowed="a subset (config) name",
        empty_ok=True,
    ),
    Option(
        "dataset_revision",
        "str",
        "main",
        "Hub dataset: branch, tag or commit; prepare pins the commit it resolves to. (--revision is the model's.)",
        pattern=_REVISION,
        allowed="a hub revision",
    ),
    Option("max_rows", "int", 0, "Read only the first N rows (0 = all): a test-size run.", lo=0),
    Option(
        "max_tokens",
        "int",
        0,
        "Stop after the unit in which the stored tokens reach N (0 = no limit): a test-size run.",
        where=(TOML, EXTRACT, JOB),
        lo=0,
    ),
    # How rows become samples.
    Option("format", "choice", "text", "How rows are rendered: text, chat (a chat template) or arc.", choices=FORMATS),
    Option(
        "text_field", "str", "text", "Field holding the text (format text).", pattern=_FIELD, allowed="a field name"
    ),
    Option(
        "messages_field",
        "str",
        "messages",
        "Field holding the chat messages (format chat).",
        pattern=_FIELD,
        allowed="a field name",
    ),
    Option(
        "tokens_field",
        "str",
        "",
        "Pre-tokenized input: the field holding each row's token ids (e.g. input_ids); no tokenizer is run.",
        pattern=_FIELD,
        allowed="a field name",
        empty_ok=True,
    ),
    Option(
        "context_size",
        "int",
        0,
        "Cut documents into windows of exactly N tokens, SAELens-style (0 = one sample per document).",
        where=_ALL + (SHARD,),
        lo=0,
        hi=1 << 20,
    ),
    Option(
        "separator",
        "choice",
        "eos",
        "With --context-size: the token between documents joined in a window.",
        where=_ALL + (SHARD,),
        choices=SEPARATORS,
    ),
    Option(
        "prepend_bos",
        "bool",
        True,
        "With --context-size: start every window with the BOS token.",
        where=_ALL + (SHARD,),
    ),
    Option(
        "concat",
        "bool",
        True,
        "With --context-size: join documents into windows (--no-concat: each document is cut into its own windows).",
        where=_ALL + (SHARD,),
    ),
    Option(
        "arc_augmentations",
        "int",
        0,
        "Augmented copies per ARC task (flips/rotations, colours, train order).",
        lo=0,
        hi=64,
    ),
    Option("arc_seed", "int", 0, "Seed of the ARC augmentations.", lo=0),
    # What is captured and stored.
    Option(
        "sites",
        "sites",
        (site_names.name("resid_post", site_names.ALL_LAYERS),),
        "Site kinds (" + ", ".join(site_names.KINDS) + ") or names like blocks.6.hook_resid_post, comma-separated.",
        flag_default="resid_post",
    ),
    Option(
        "layers",
        "layers",
        [],
        'Layers for the site kinds: "0,5,11" or "all".',
        where=(TOML, PREPARE, EXTRACT),
        flag_default="all",
    ),
    Option(
        "positions",
        "choice",
        None,  # not given: implied by context_size (implied_positions), so "all" with windows
        "Which tokens of each sample are stored: all; non-special (all but BOS/EOS/pad and other special "
        "tokens); last (the final token only). Default: non-special; with --context-size, all (the only "
        "choice there: a window is stored whole).",
        where=_ALL + (SHARD,),
        choices=POSITIONS,
    ),
    Option(
        "max_seq",
        "int",
        0,
        "Longest input in tokens (0 = the model's context).",
        where=_ALL + (SHARD,),
        lo=0,
        hi=1 << 20,
    ),
    Option(
        "long_inputs",
        "choice",
        "skip",
        "What to do with inputs longer than --max-seq (counted in summary.json).",
        choices=LONG_INPUTS,
    ),
    Option("batch_tokens", "int", 16384, "Tokens per device batch.", lo=16, hi=1 << 24),
    Option(
        "compute_dtype",
        "choice",
        "bfloat16",
        "Dtype of the forward pass (norms, softmax, scores: float32).",
        where=_ALL + (SHARD,),
        choices=DTYPES,
    ),
    Option(
        "store_dtype", "choice", "bfloat16", "Dtype of the stored activations.", where=_ALL + (SHARD,), choices=DTYPES
    ),
    Option("shard_mb", "number", 512, "Approximate shard size in MiB (2**20 bytes).", lo=0.001, hi=8192),
    Option(
        "stats",
        "choice",
        "moments",
        "Per-unit activation statistics for `actfleet stats`: moments (count, sums, sums of squares), gram (also "
        "each site's d x d Gram matrix, for whitening) or none.",
        choices=STATS,
    ),
    Option(
        "model_parallel",
        "int",
        1,
        "Devices that split one copy of the model (attention heads and MLP); must divide the device count, the "
        "heads and the MLP size.",
        lo=1,
        hi=4096,
    ),
    Option(
        "unit_rows",
        "int",
        DEFAULT_UNIT_ROWS,
        "Rows per work unit (extract: per engine run, exactly like a fleet job's unit_rows: same rows, same bits).",
        where=(TOML, PREPARE, EXTRACT),
        lo=1,
    ),
    Option("lease_seconds", "int", DEFAULT_LEASE_SECONDS, where=(TOML,), lo=10, hi=86400),
)
OPTIONS: dict[str, Option] = {o.name: o for o in TABLE}


def applying(where: str) -> tuple[Option, ...]:
    """The options that apply in one place (TOML, PREPARE, EXTRACT, JOB or SHARD), in table order."""
    return tuple(o for o in TABLE if where in o.where)


def implied_positions(context_size: int, positions: str | None, what: str = "--positions") -> str:
    """The positions a job stores: `positions` as given (None: not given) with `context_size`. Windows are
    stored whole (every token, BOS and separators included: what SAELens's fixed-size rows are), so
    --context-size implies "all"; an explicit other choice would make every window short and the export drop
    it, and is refused (BadValue) where the options are given, before any work."""
    if positions is None:
        return "all" if context_size else "non-special"
    if context_size and positions != "all":
        raise BadValue(
            f"{what} {positions}: with context_size {context_size} every window is stored whole, so positions "
            f"must be all (its default there; SAELens drops special tokens at training: exclude_special_tokens)"
        )
    return positions


def _default(name: str) -> Any:
    return OPTIONS[name].default


@dataclass(frozen=True)
class JobOptions:
    model: str = _default("model")  # a local dir, gs:// prefix or hub id ("" only for jobs whose extractor needs none)
    revision: str = _default("revision")
    # Which rows (actfleet.worker.sources): a hub dataset's split, subset (config) and revision.
    split: str = _default("split")
    subset: str = _default("subset")
    dataset_revision: str = _default("dataset_revision")
    max_rows: int = _default("max_rows")  # 0: every row; else only the first max_rows rows (test-size runs)
    max_tokens: int = _default("max_tokens")  # extract only: where to stop (0: no limit)
    format: str = _default("format")  # text | chat | arc
    text_field: str = _default("text_field")
    messages_field: str = _default("messages_field")
    tokens_field: str = _default("tokens_field")  # pre-tokenized: the token-ids field ("": tokenize)
    arc_augmentations: int = _default("arc_augmentations")
    arc_seed: int = _default("arc_seed")
    sites: tuple[str, ...] = _default("sites")  # site names, see actfleet.sites
    positions: str = _default("positions")  # all | non-special | last (None: implied by context_size)
    max_seq: int = _default("max_seq")  # 0: the model's context length
    long_inputs: str = _default("long_inputs")  # skip | truncate
    batch_tokens: int = _default("batch_tokens")
    compute_dtype: str = _default("compute_dtype")  # bfloat16 | float32
    store_dtype: str = _default("store_dtype")  # bfloat16 | float32
    shard_mb: float = _default("shard_mb")  # approximate shard size in MiB (2**20 bytes)
    stats: str = _default("stats")  # moments | gram | none: what each unit's statistics object holds
    model_parallel: int = _default("model_parallel")  # devices splitting one model copy; the rest split the batch
    # Context windows (docs/jobs.md, "Context windows"): 0 = one sample per document, as before.
    context_size: int = _default("context_size")  # N > 0: documents tokenized, joined, cut into N-token windows
    separator: str = _default("separator")  # eos | bos | none: the token between documents joined in a window
    prepend_bos: bool = _default("prepend_bos")  # every window starts with BOS
    concat: bool = _default("concat")  # False: each document is cut into its own windows

    def __post_init__(self):
        if self.positions is None:  # not given: windows store every token (implied_positions)
            object.__setattr__(self, "positions", implied_positions(self.context_size, None))
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))
        for o in applying(JOB):
            value = getattr(self, o.name)
            if o.type == "sites":
                if not isinstance(value, tuple) or not all(isinstance(s, str) and site_names.is_name(s) for s in value):
                    raise ValueError(f"sites {value!r}: must be site names like hook_embed or blocks.6.hook_resid_post")
                continue
            try:
                o.check(value)
            except BadValue as e:
                raise ValueError(f"{o.name} {value!r}: {e}") from None
        if self.tokens_field and self.format != "text":
            raise ValueError(f"tokens_field {self.tokens_field!r}: pre-tokenized rows need format text")

    def input_options(self) -> dict[str, Any]:
        """How the dataset is read into rows: the keyword arguments of actfleet.worker.inputs.read_source_rows."""
        return {
            "format": self.format,
            "text_field": self.text_field,
            "messages_field": self.messages_field,
            "tokens_field": self.tokens_field,
            "arc_augmentations": self.arc_augmentations,
            "arc_seed": self.arc_seed,
        }

    def samples_per_row(self) -> int:
        """Samples one input row becomes (ARC: the original and its augmentations): job.json's rows count them."""
        return self.arc_augmentations + 1 if self.format == "arc" else 1

    def source_options(self) -> dict[str, Any]:
        """How the input reference resolves to files: keyword arguments of actfleet.worker.sources.resolve."""
        return {"split": self.split, "subset": self.subset, "revision": self.dataset_revision}

    def replace(self, **changes: Any) -> "JobOptions":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON form job.json stores (sites as a list)."""
        return {**dataclasses.asdict(self), "sites": list(self.sites)}

    @staticmethod
    def from_json(d: dict[str, Any], what: str = "options") -> "JobOptions":
        """From the JSON form; missing keys take the defaults. Unknown keys or bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{what}: must be a JSON object")
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ValueError(f"{what}: unknown options {', '.join(unknown)}")
        return JobOptions(**d)


KEYS = tuple(f.name for f in dataclasses.fields(JobOptions))
assert set(KEYS) == {o.name for o in applying(JOB)}, "JobOptions' fields must be the table's JOB options"
DEFAULTS = JobOptions()
