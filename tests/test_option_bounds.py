"""The option table (actfleet/job_options.py) is enforced identically from fleet.toml, `actfleet prepare` and
`actfleet extract`: generated from the table itself, for every bound and choice, a value just outside is refused
by each (exit 2, one line naming the option, the same 'what is allowed' words) and the boundary value accepted."""

from __future__ import annotations

import math

import pytest

from actfleet import config, job_options
from actfleet.cli import main
from actfleet.errors import EXIT_BAD_INPUT, ConfigError
from actfleet.job_options import EXTRACT, JOB, OPTIONS, PREPARE, SHARD, TABLE, TOML, JobOptions
from actfleet.worker import shards
from actfleet.worker.commands.extract import extract
from actfleet.worker.commands.jobs import prepare

BASE = {
    "fleet": {"id": "acts", "project": "my-project-1", "region": "us-central1", "zones": {"us-central1-a": 1}},
    "repo": {"url": "https://github.com/example/actfleet.git", "commit": "0" * 40},
    "storage": {"bucket": "my-acts"},
    "job": {"model": "m", "input": "gs://my-acts/d.jsonl", "layers": [1]},
    "reconcile": {"heartbeat_timeout_minutes": 0},
}  # off: its cross-key rule with lease_seconds is not a bound


def cases():
    """(option, value, refused?) for every bound and choice of the table."""
    for o in TABLE:
        if o.type == "int":
            for edge, out in ((o.lo, -1), (o.hi, +1)):
                if edge is not None:
                    yield o, int(edge), False
                    yield o, int(edge) + out, True
        elif o.type == "number":
            for edge, toward in ((o.lo, -math.inf), (o.hi, math.inf)):
                if edge is not None:
                    yield o, float(edge), False
                    yield o, math.nextafter(float(edge), toward), True
        elif o.type == "choice":
            yield from ((o, c, False) for c in o.choices)
            yield o, o.choices[0] + "x", True
        elif o.type == "str" and o.pattern:
            yield o, "a b", True  # no option's pattern takes a blank
            yield o, "x", False


CASES = list(cases())


def test_every_bounded_option_is_covered():
    names = {o.name for o, _, _ in CASES}
    assert {
        "shard_mb",
        "batch_tokens",
        "context_size",
        "max_seq",
        "model_parallel",
        "unit_rows",
        "arc_augmentations",
        "positions",
        "separator",
    } <= names
    # Each place an option applies is exercised below; the ones every command shares are the bulk.
    assert sum(1 for o, _, _ in CASES if {TOML, PREPARE, EXTRACT} <= set(o.where)) > 40


def flag_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def toml_verdict(o, value):
    """None when fleet.toml accepts the value (and it reaches the config as given), else the refusal's words."""
    raw = {**BASE, "job": {**BASE["job"], o.name: value}}
    try:
        c = config.parse(raw, source="fleet.toml")
    except ConfigError as e:
        assert e.exit_code == EXIT_BAD_INPUT and "\n" not in str(e)
        prefix = f"fleet.toml: job.{o.name} = "
        assert str(e).startswith(prefix), str(e)
        return str(e).split(": ", 2)[2]
    if JOB in o.where:
        assert getattr(c.job.options, o.name) == value
    return None


def cli_verdict(capsys, command, o, value):
    """None when the command's flag takes the value, else the words after the flag and value."""
    base = ["--store", "unused-store"] if command == PREPARE else ["--model", "m", "--input", "i", "--out", "o"]
    args = [command, *base, o.flag, flag_text(value)]
    cmd = prepare if command == PREPARE else extract
    try:
        ctx = cmd.make_context(command, args[1:])
    except Exception:  # the refusal: through the console script, for its exit code and line
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == EXIT_BAD_INPUT, err
        assert err.count("\n") == 1 and err.startswith(f"actfleet: {o.flag} {flag_text(value)}: "), err
        return err.strip().split(": ", 2)[2]
    assert ctx.params[o.name] == value
    if JOB in o.where:  # what the command builds from it
        assert getattr(JobOptions(**{o.name: value}), o.name) == value
    return None


@pytest.mark.parametrize("o, value, refused", CASES, ids=[f"{o.name}={v!r}" for o, v, _ in CASES])
def test_bound_is_enforced_identically_everywhere(capsys, o, value, refused):
    verdicts = {}
    if TOML in o.where:
        verdicts[TOML] = toml_verdict(o, value)
    for command in (PREPARE, EXTRACT):
        if command in o.where:
            verdicts[command] = cli_verdict(capsys, command, o, value)
    if JOB in o.where and o.type != "str":
        try:
            JobOptions(**{o.name: value})
            verdicts[JOB] = None
        except ValueError as e:
            assert str(e).startswith(f"{o.name} {value!r}: ")
            verdicts[JOB] = str(e).split(": ", 1)[1]
    assert verdicts, o
    if refused:
        words = set(verdicts.values())
        assert None not in words and len(words) == 1, verdicts  # refused everywhere, in the same words
    else:
        assert set(verdicts.values()) == {None}, verdicts


def test_jobs_options_and_shard_metadata_come_from_the_table():
    assert job_options.DEFAULTS == JobOptions(**{o.name: o.default for o in TABLE if JOB in o.where})
    meta = shards.job_metadata(JobOptions(positions="last", context_size=8), max_seq=8, d_model=4)
    assert {o.name for o in TABLE if SHARD in o.where} <= set(meta)
    assert meta["positions"] == "last" and meta["context_size"] == "8" and meta["prepend_bos"] == "true"
    assert set(config.SCHEMA["job"]) == {o.name for o in TABLE if TOML in o.where}
    assert OPTIONS["model"].required and isinstance(config.SCHEMA["job"]["model"].default, object)
