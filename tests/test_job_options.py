"""actfleet.job_options.JobOptions (the options a job pins) and actfleet.sites (site names and order)."""

from __future__ import annotations

import pytest

from actfleet import sites
from actfleet import work_queue as q
from actfleet.errors import ActfleetError
from actfleet.job_options import DEFAULTS, JobOptions


def test_json_form_round_trips_and_fills_defaults():
    o = JobOptions(model="m", sites=("hook_embed", "blocks.2.hook_mlp_out"), positions="last", shard_mb=0.5)
    assert JobOptions.from_json(o.to_json()) == o
    assert o.to_json()["sites"] == ["hook_embed", "blocks.2.hook_mlp_out"]
    assert JobOptions.from_json({}) == DEFAULTS and JobOptions.from_json({"model": "m"}).revision == "main"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"positions": "first"}, "positions 'first': use one of all, non-special, last"),
        ({"store_dtype": "float16"}, "store_dtype 'float16'"),
        ({"batch_tokens": 0}, "batch_tokens 0: must be an integer from 16 to 16777216"),  # was >= 1 (one bound)
        ({"shard_mb": 0}, "shard_mb 0: must be a number from 0.001 to 8192"),  # was > 0 (one bound)
        ({"sites": ("resid_post",)}, "must be site names"),
    ],
)
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        JobOptions(**changes)


def test_job_json_with_unknown_options_is_a_corrupt_record():
    spec = q.JobSpec(job="j", input="x", fingerprint="0" * 64, rows=1, unit_rows=1, units=1, options=DEFAULTS)
    assert q.JobSpec.from_json(spec.to_json()) == spec
    bad = spec.to_json().replace(b'"arc_seed"', b'"arc_sead"')
    with pytest.raises(ActfleetError, match="unknown options arc_sead"):
        q.JobSpec.from_json(bad)


def test_site_names_parse_expand_resolve_and_sort():
    assert sites.parse("hook_embed") == (None, "embed")
    assert sites.parse("blocks.6.hook_mlp_out") == (6, "mlp_out")
    assert sites.parse("blocks.*.hook_resid_post") == ("*", "resid_post") and sites.parse("blocks.6") is None
    assert sites.name("attn_out", 3) == "blocks.3.hook_attn_out" and sites.name("embed") == "hook_embed"
    assert sites.expand(["resid_post", "embed"], [10, 2]) == (
        "hook_embed",
        "blocks.2.hook_resid_post",
        "blocks.10.hook_resid_post",
    )
    assert sites.expand(["mlp_out"], "all") == ("blocks.*.hook_mlp_out",)
    assert sites.resolve(["blocks.*.hook_attn_out", "hook_embed"], 2) == (
        "hook_embed",
        "blocks.0.hook_attn_out",
        "blocks.1.hook_attn_out",
    )
    with pytest.raises(ValueError, match="the model has layers 0..1"):
        sites.resolve(["blocks.2.hook_resid_post"], 2)
    assert sites.layers_needed(["hook_embed", "blocks.4.hook_mlp_out"]) == 5 and sites.layers_needed([]) == 0


def test_every_layer_kind_has_its_transformer_lens_name():
    # Literal TransformerLens hook names (HookedTransformer.hook_dict keys for block 3), not derived from HOOKS.
    tl = {
        "resid_pre": "blocks.3.hook_resid_pre",
        "resid_mid": "blocks.3.hook_resid_mid",
        "resid_post": "blocks.3.hook_resid_post",
        "attn_out": "blocks.3.hook_attn_out",
        "mlp_out": "blocks.3.hook_mlp_out",
        "ln1": "blocks.3.ln1.hook_normalized",
        "ln2": "blocks.3.ln2.hook_normalized",
        "attn_z": "blocks.3.attn.hook_z",
        "mlp_pre": "blocks.3.mlp.hook_pre",
        "mlp_post": "blocks.3.mlp.hook_post",
    }
    assert set(sites.LAYER_KINDS) == set(tl)
    for kind, name in tl.items():
        assert sites.name(kind, 3) == name and sites.parse(name) == (3, kind)
        assert sites.parse(name.replace(".3.", ".*.")) == ("*", kind)
    assert sites.parse("blocks.3.ln1xhook_normalized") is None and sites.parse("blocks.3.attn.hook_q") is None
    assert sites.expand(["ln2", "mlp_post"], [1]) == ("blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post")
