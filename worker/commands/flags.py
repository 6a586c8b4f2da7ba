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
from actfleet.job_options import EXTRACT, KEYS, PREPARE, BadValue, JobOptions, Option, applying


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


def job_options(command: str):
    """Decorator adding every table option that applies to `command` (EXTRACT or PREPARE), in table order; the
    command receives them as keyword arguments named after the options."""
    if command not in (EXTRACT, PREPARE):
        raise ValueError(f"job_options: {command!r} is not a command of the table")

    def deco(f):
        for o in reversed(applying(command)):
            f = _option(o, command)(f)
        return f

    return deco


def options_from_flags(flags: dict, base: JobOptions) -> JobOptions:
    """JobOptions from the job-option flags given (None: not given, `base`'s value stands); --sites/--layers
    become site names. InputError on a value JobOptions refuses (a cross-option rule)."""
    changes = {k: v for k, v in flags.items() if k in KEYS and k != "sites" and v is not None}
    if flags.get("sites") is not None or flags.get("layers") is not None:
        changes["sites"] = site_names.from_flags(flags.get("sites") or "resid_post", flags.get("layers") or "")
    try:
        return base.replace(**changes)
    except ValueError as e:
        raise InputError(str(e)) from None
