"""Capture sites, defined once: their kinds, TransformerLens names, layers and the order they are stored in.

A site is named as TransformerLens names its hook: "hook_embed" (the embedding output) or "blocks.{L}.{hook}"
for a decoder layer L, where the hook of each kind is in HOOKS (e.g. kind "ln2" is "blocks.3.ln2.hook_normalized").
The layer "*" ("blocks.*.hook_resid_post") stands for every layer, resolved against the model's depth by `resolve`.
What each kind holds, exactly, is in docs/extractor.md ("Sites"); the model code computes them
(actfleet.worker.models) and the parity tests check each against transformers.

Config ([job] sites/layers), the CLI (--sites/--layers), the engine and the model families all use these
functions; a shard's metadata lists its sites in `sort_key` order.
"""

from __future__ import annotations

import re

from actfleet.errors import ConfigError, InputError

EMBED = "hook_embed"
# Kinds with one site per decoder layer -> their TransformerLens hook name under "blocks.{L}.", in the order the
# layer computes them.
HOOKS = {
    "resid_pre": "hook_resid_pre",  # the layer's input (resid_post of L-1; hook_embed for L = 0)
    "ln1": "ln1.hook_normalized",  # resid_pre / rms(resid_pre), before the norm's weight
    "attn_z": "attn.hook_z",  # per-head attention outputs before o_proj, heads * head_dim wide
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",  # resid_pre + attn_out
    "ln2": "ln2.hook_normalized",  # resid_mid / rms(resid_mid), before the norm's weight
    "mlp_pre": "mlp.hook_pre",  # the gate's pre-activation, d_mlp wide
    "mlp_post": "mlp.hook_post",  # act(gate) * up, d_mlp wide
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",  # the layer's output (before the final norm for the last layer)
}
LAYER_KINDS = tuple(HOOKS)
KINDS = ("embed", *LAYER_KINDS)
ALL_LAYERS = "*"  # the layer of a site name that stands for every layer
_KIND_OF_HOOK = {hook: kind for kind, hook in HOOKS.items()}
ALLOWED = "use a site kind (" + ", ".join(KINDS) + ') or a name like "blocks.6.hook_resid_post", "hook_embed"'
NAME_RE = re.compile(r"^(hook_embed|blocks\.(\d+|\*)\.(" + "|".join(map(re.escape, HOOKS.values())) + r"))$")


def name(kind: str, layer: int | str | None = None) -> str:
    """The TransformerLens name of a site: name("embed") -> "hook_embed", name("mlp_out", 6) ->
    "blocks.6.hook_mlp_out"; layer ALL_LAYERS gives the every-layer marker."""
    return EMBED if kind == "embed" else f"blocks.{layer}.{HOOKS[kind]}"


def parse(site: str) -> tuple[int | str | None, str] | None:
    """A site name -> (layer, kind): "hook_embed" -> (None, "embed"), "blocks.6.hook_mlp_out" -> (6, "mlp_out"),
    "blocks.*.hook_resid_post" -> ("*", "resid_post"); None for anything else."""
    m = NAME_RE.fullmatch(site)
    if not m:
        return None
    if m[2] is None:
        return None, "embed"
    return (ALL_LAYERS if m[2] == ALL_LAYERS else int(m[2])), _KIND_OF_HOOK[m[3]]


def is_name(site: str, every_layer_ok: bool = True) -> bool:
    """Whether `site` is a site name (with the every-layer marker only if `every_layer_ok`)."""
    p = parse(site)
    return p is not None and (every_layer_ok or p[0] != ALL_LAYERS)


def sort_key(site: str) -> tuple[int, str]:
    """hook_embed first, then by layer (the every-layer marker last), then by name: the order sites appear in
    a shard's metadata."""
    p = parse(site)
    if p is None or p[0] is None:
        return (-1, site)
    return (1 << 30 if p[0] == ALL_LAYERS else p[0], p[1])


def expand(sites: list[str] | tuple[str, ...], layers: list[int] | str, source: str = "<args>") -> tuple[str, ...]:
    """Site kinds x layers -> sorted site names; full names pass through. `layers="all"` gives the marker
    "blocks.*.hook_KIND", resolved against the model's depth by `resolve`."""
    out: list[str] = []
    for s in sites:
        if s == "embed":
            out.append(EMBED)
        elif s in LAYER_KINDS:
            if layers == "all":
                out.append(name(s, ALL_LAYERS))
            elif not layers:
                raise ConfigError(
                    f'{source}: job.layers = []: site kind "{s}" needs layers, e.g. layers = [6, 12] or "all"'
                )
            else:
                out += [name(s, layer) for layer in layers]
        elif is_name(s):
            out.append(s)
        else:
            raise InputError(f'{source}: "{s}" is no site kind or name; {ALLOWED}')
    return tuple(sorted(set(out), key=sort_key))


def from_flags(sites: str, layers: str) -> tuple[str, ...]:
    """--sites "resid_post,embed" --layers "0,5" (or "all") -> sorted site names, as `expand`."""
    kinds = [s.strip() for s in sites.split(",") if s.strip()]
    if layers.strip() == "all":
        return expand(kinds, "all", "--sites/--layers")
    try:
        lay = sorted({int(x) for x in layers.split(",") if x.strip()})
    except ValueError:
        raise InputError(f'--layers {layers}: must be comma-separated layer indices like "6,12", or "all"') from None
    return expand(kinds, lay, "--sites/--layers")


def resolve(sites, n_layers: int) -> tuple[str, ...]:
    """Expand "blocks.*.hook_x" to every layer of an `n_layers` model, check names and layer bounds (ValueError),
    return them in shard order."""
    out: set[str] = set()
    for s in sites:
        p = parse(s)
        if p is None:
            raise ValueError(f'site "{s}": use hook_embed or blocks.L.' + "|".join(HOOKS.values()))
        layer, kind = p
        if layer == ALL_LAYERS:
            out.update(name(kind, i) for i in range(n_layers))
        elif layer is not None and layer >= n_layers:
            raise ValueError(f'site "{s}": the model has layers 0..{n_layers - 1}')
        else:
            out.add(s)
    return tuple(sorted(out, key=sort_key))


def layers_needed(sites) -> int:
    """How many decoder layers must run to produce these (resolved) sites."""
    return max((p[0] + 1 for p in map(parse, sites) if p is not None and isinstance(p[0], int)), default=0)
