"""actfleet.job_options.JobOptions (the options a job pins) and actfleet.sites (site names and order)."""

from __future__ import annotations

import pytest

from actfleet import sites
from actfleet.errors import ActfleetError
from actfleet.job_options import DEFAULTS, JobOptions
from actfleet.worker import work_queue as q


def test_json_form_round_trips_and_fills_defaults():
    o = JobOptions(model="m", sites=("hook_embed", "blocks.2.hook_mlp_out"), positions="last", shard_mb=0.5)
    assert JobOptions.from_json(o.to_json()) == o
    assert o.to_json()["sites"] == ["hook_embed", "blocks.2.hook_mlp_out"]
    assert JobOptions.from_json({}) == DEFAULTS and JobOptions.from_json({"model": "m"}).revision == "main"


@pytest.mark.parametrize("changes, message", [
    ({"positions": "first"}, "positions 'first': use one of all, non-special, last"),
    ({"store_dtype": "float16"}, "store_dtype 'float16'"),
    ({"batch_tokens": 0}, "batch_tokens 0: must be an integer >= 1"),
    ({"shard_mb": 0}, "shard_mb 0: must be a number > 0"),
    ({"sites": ("resid_post",)}, "must be site names"),
])
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
        "hook_embed", "blocks.2.hook_resid_post", "blocks.10.hook_resid_post")
    assert sites.expand(["mlp_out"], "all") == ("blocks.*.hook_mlp_out",)
    assert sites.resolve(["blocks.*.hook_attn_out", "hook_embed"], 2) == (
        "hook_embed", "blocks.0.hook_attn_out", "blocks.1.hook_attn_out")
    with pytest.raises(ValueError, match="the model has layers 0..1"):
        sites.resolve(["blocks.2.hook_resid_post"], 2)
    assert sites.layers_needed(["hook_embed", "blocks.4.hook_mlp_out"]) == 5 and sites.layers_needed([]) == 0
