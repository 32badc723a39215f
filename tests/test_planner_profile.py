"""Profiles: the shipped analytic H100 profile, the loader's validation, piecewise-linear tables."""

import copy
import json

import pytest

from planner.cost_model.analytic_profile import (
    AnalyticRates,
    analytic_profile_dict,
    block_decode_s,
    block_forward_s,
    compact_json,
    preset_specs,
)
from planner.cost_model.profile import (
    LAYER_KINDS,
    OPTIONAL_OPS,
    PROFILE_DIR,
    REQUIRED_OPS,
    Table2D,
    default_profile,
    load_profile,
    profile_from_dict,
    shape_key,
)
from reallm.cluster import load_cluster
from reallm.errors import UserError
from reallm.spec import ModelSpec, preset_spec

SHIPPED = str(PROFILE_DIR / "h100_analytic.json")


def test_shipped_h100_profile_is_analytic_and_covers_presets():
    prof = load_profile(SHIPPED)
    assert prof.source == "analytic" and "ANALYTIC" in prof.notes and prof.device == "NVIDIA H100 80GB HBM3"
    for spec in preset_specs():
        assert shape_key(spec) in prof.layers
        for tp in (1, 2, 4, 8):
            for kind in LAYER_KINDS:
                ops = set(prof.layers[shape_key(spec)][kind][tp])
                assert set(REQUIRED_OPS[kind]) <= ops <= set(REQUIRED_OPS[kind]) | set(OPTIONAL_OPS.get(kind, ())), \
                    (kind, tp)
    # The shipped file is exactly what the generator writes (regenerate with the module's main).
    d = analytic_profile_dict(AnalyticRates.h100(), preset_specs(), device="NVIDIA H100 80GB HBM3")
    assert json.loads(compact_json(d)) == json.loads(open(SHIPPED).read())


def test_table_is_piecewise_linear_holds_below_and_extrapolates_above():
    t = Table2D("seqlen", "tokens", (128.0, 1024.0), (10.0, 20.0, 40.0), ((1.0, 2.0, 4.0), (3.0, 4.0, 8.0)))
    assert t(128, 10) == 1.0 and t(1024, 40) == 8.0
    assert t(128, 15) == pytest.approx(1.5)  # linear in tokens
    assert t(576, 20) == pytest.approx(3.0)  # linear in seqlen
    assert t(128, 5) == 1.0  # held below the grid
    assert t(128, 60) == pytest.approx(6.0)  # last segment extrapolated
    assert t(2048, 20) == pytest.approx(4.0 + (2048 - 1024) / 896 * 2.0)


def test_profile_times_match_the_analytic_formulas_at_grid_points():
    prof = load_profile(SHIPPED)
    spec = preset_spec("llama", 13)
    r = AnalyticRates.h100()
    for tp in (1, 4):
        assert prof.layer_time_s(spec, "block", "forward", tp, 4096, 1024) == pytest.approx(
            block_forward_s(spec, tp, 4096, 1024, r), rel=1e-4)
        assert prof.decode_time_s(spec, "block", tp, 64, 2048) == pytest.approx(block_decode_s(spec, tp, 64, 2048, r), rel=1e-4)
    # more tp: less time per rank; decode grows with the KV length
    assert prof.layer_time_s(spec, "block", "forward", 8, 8192, 1024) < prof.layer_time_s(spec, "block", "forward", 1, 8192, 1024)
    assert prof.decode_time_s(spec, "block", 1, 64, 8192) > prof.decode_time_s(spec, "block", 1, 64, 512)


def test_loader_reports_every_problem_at_once():
    d = json.loads(open(SHIPPED).read())
    bad = copy.deepcopy(d)
    key = next(iter(bad["models"]))
    blk = bad["models"][key]["layers"]["block"]["1"]
    del blk["decode"]
    blk["forward"]["tokens"] = [5, 3, 9] + blk["forward"]["tokens"][3:]
    bad["collectives"]["nvlink"]["2"]["bandwidth_bytes_per_s"] = -1
    bad["optimizer"]["time_s_per_param"] = "fast"
    with pytest.raises(UserError) as e:
        profile_from_dict(bad, where="bad.json")
    msg = str(e.value)
    for needle in ("missing op(s) ['decode']", "strictly increasing", "collectives.nvlink.2", "time_s_per_param"):
        assert needle in msg
    with pytest.raises(UserError, match="not a reallm profile"):
        profile_from_dict({"format": "other"})
    with pytest.raises(UserError, match="newer"):
        profile_from_dict(dict(d, version=99))


def test_roundtrip_and_a_cpu_profile_fits_the_schema():
    tiny = ModelSpec("llama", 2, 64, 128, 4, 2, 16, 256, source="tiny")
    d = analytic_profile_dict(AnalyticRates.from_cluster(load_cluster("cpu")), [tiny], device="cpu", dtype="fp32")
    d["source"] = "measured"  # the model core's CPU profile will have this shape
    prof = profile_from_dict(json.loads(json.dumps(d)))
    assert prof.dtype == "fp32" and prof.layer_time_s(tiny, "block", "forward", 2, 64, 32) > 0
    again = profile_from_dict(json.loads(prof.dumps()))
    assert again.to_dict() == prof.to_dict()


def test_missing_shape_falls_back_to_analytic_and_says_so():
    prof = load_profile(SHIPPED)
    odd = ModelSpec("llama", 4, 1024, 2816, 16, 16, 64, 1000, source="odd")
    assert prof.layer_time_s(odd, "block", "forward", 2, 1024, 256) > 0
    assert any(shape_key(odd) in f for f in prof.fallbacks)
    # h100 clusters use the shipped measured profile; a cluster without one falls back to the analytic
    assert default_profile(load_cluster("h100")).source == ("measured" if (PROFILE_DIR / "h100_measured.json").exists()
                                                            else "analytic")
