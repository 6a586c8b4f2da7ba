"""Refusing what a family's model code does not compute: one error type, one message shape.

A family's `Config.from_hf` calls `refuse` for a config.json field whose value changes the forward pass in a
way the model code does not reproduce; the engine reports it as bad input (exit 2) before any work.
"""

from __future__ import annotations


class UnsupportedConfig(ValueError):
    """config.json asks for something the model code does not compute (the message names the field)."""


def refuse(family: str, field: str, value, why: str):
    raise UnsupportedConfig(f"config.json {field}={value!r}: {why} (actfleet's {family} model does not compute it)")
