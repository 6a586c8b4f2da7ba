"""The job-option flags of `extract` and `prepare`, generated from the option table (actfleet/job_options.py).

Each flag is an Option of the table that applies to the command (`where` holds EXTRACT or PREPARE), spelled
`--` + its name with `-` for `_` (a bool is `--x/--no-x`), and is checked by the table's own `Option.check`:
a value out of bounds ends the command with one line naming the flag (InputError, exit 2), in the same words
fleet.toml's [job] and JobOptions use. `extract` shows the table's defaults and requires what fleet.toml
requires (model, input); `prepare` passes None for a flag not given, so fleet.toml's [job] value (or the
default) stands.
"""

from __future__ import annotations

import click

from actfleet import sites as site_names
from actfleet.errors import InputError
from actfleet.job_options import (
    EXTRACT,
    KEYS,
    OPTIONS,
    PREPARE,
    BadValue,
    JobOptions,
    Option,
    applying,
    implied_positions,
)


class _TableType(click.ParamType):
    """A flag's value: parsed from the command line, then checked by the table (one line naming the flag)."""

    def __init__(self, option: Option):
        self.option = option
        self.name = {"int": "integer", "number": "float"}.get(option.type, "text")

    def get_metavar(self, param, ctx=None):
        if self.option.type == "choice":
            return "[" + "|".join(self.option.choices) + "]"
        return {"int": "INTEGER", "number": "FLOAT"}.get(self.option.type, "TEXT")

    def convert(self, value, param, ctx):
        o = self.option
        if not isinstance(value, str):  # a default, already a value
            return value
        v = value
        try:
            v = int(value) if o.type == "int" else float(value) if o.type == "number" else value
        except ValueError:
            pass  # check() refuses the text in the table's words
        try:
            return o.check(v)
        except BadValue as e:
            raise InputError(f"{o.flag} {value}: {e}") from None


def _option(o: Option, command: str):
    extract = command == EXTRACT
    required = extract and o.required
    # No default at all for a required flag (a default None would count as given).
    default = (
        {} if required else {"default": (o.default if o.flag_default is None else o.flag_default) if extract else None}
    )
    if o.type == "bool":
        return click.option(f"{o.flag}/--no-{o.flag[2:]}", o.name, show_default=extract, help=o.help, **default)
    return click.option(
        o.flag, o.name, type=_TableType(o), show_default=extract, required=required, help=o.help, **default
    )


def job_options(command: str, only: tuple[str, ...] | None = None):
    """Decorator adding every table option that applies to `command` (EXTRACT or PREPARE), in table order; the
    command receives them as keyword arguments named after the options. `only`: just these (for a command
    that passes them on to `prepare`, as `actfleet local` does)."""
    if command not in (EXTRACT, PREPARE):
        raise ValueError(f"job_options: {command!r} is not a command of the table")
    chosen = [o for o in applying(command) if only is None or o.name in only]
    if only is not None and len(chosen) != len(only):
        raise ValueError(f"job_options: not {command} options: {sorted(set(only) - {o.name for o in chosen})}")

    def deco(f):
        for o in reversed(chosen):
            f = _option(o, command)(f)
        return f

    return deco


def options_from_flags(flags: dict, base: JobOptions, base_positions: str | None = None) -> JobOptions:
    """JobOptions from the job-option flags given (None: not given, `base`'s value stands); --sites/--layers
    become site names. `base_positions`: the positions `base`'s source set explicitly (None: implied there), so
    --context-size implies --positions all unless one was chosen (job_options.implied_positions). InputError on
    a value JobOptions refuses (a cross-option rule)."""
    changes = {k: v for k, v in flags.items() if k in KEYS and k not in ("sites", "positions") and v is not None}
    if flags.get("sites") is not None or flags.get("layers") is not None:
        changes["sites"] = site_names.from_flags(flags.get("sites") or "resid_post", flags.get("layers") or "")
    given = flags.get("positions") if flags.get("positions") is not None else base_positions
    try:
        changes["positions"] = implied_positions(changes.get("context_size", base.context_size), given)
    except BadValue as e:
        raise InputError(str(e)) from None
    try:
        return base.replace(**changes)
    except ValueError as e:
        raise InputError(str(e)) from None


def as_arguments(flags: dict) -> list[str]:
    """The given flags (None: not given) as the command line that gives them, e.g. for `actfleet prepare`."""
    out: list[str] = []
    for name, value in flags.items():
        o = OPTIONS[name]
        if value is None:
            continue
        if o.type == "bool":
            out.append(o.flag if value else f"--no-{o.flag[2:]}")
        else:
            out += [o.flag, str(value)]
    return out
