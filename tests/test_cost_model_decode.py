"""Generation in the cost model: a decode step overlaps its host and device work (pp = 1) or takes turns
(pp > 1), greedy and sampled draws read their own tables, the one-off capture counts per micro-batch, the
prefill runs in the executor's groups, and version-1 profiles still give version 1's estimates."""

import copy
import json

import pytest

from planner.cost_model.analytic_profile import AnalyticRates, analytic_profile_dict
from planner.cost_model.call_time import t_call
from planner.cost_model.profile import (
    PROFILE_VERSION,
    STEP_OPS,
    Grids,
    profile_from_dict,
    shape_key,
    upgrade_v1,
)
from planner.cost_model.shapes import (
    ModelOptions,
    prefill_chunk_tokens,
    prefill_groups,
    sampling_chunk_rows,
)
from reallm.cluster import load_cluster
from reallm.dataflow import Call
from reallm.errors import UserError
from reallm.placement import Placement
from reallm.spec import ModelSpec, preset_spec

SPEC = ModelSpec("llama", 4, 64, 128, 4, 2, 16, 256, source="tiny")
CLUSTER = load_cluster("h100")
MS = 1e-3


def _const(batches, kv_lens, value):
    return {"batch": list(batches), "kv_len": list(kv_lens), "time_s": [[value] * len(kv_lens) for _ in batches]}


def synthetic(block=0.1 * MS, block_host=0.0, head=0.05 * MS, launch=0.01 * MS, launch_host=0.2 * MS,
              greedy=0.02 * MS, greedy_host=0.1 * MS, sample=0.3 * MS, sample_host=2.0 * MS, capture=0.0,
              block_capture=0.0) -> dict:
    """A profile of SPEC whose decode tables are constants (seconds per step), tp 1 and 2."""
    d = analytic_profile_dict(AnalyticRates.h100(), [SPEC], device="test", dtype="bf16")
    layers = d["models"][shape_key(SPEC)]["layers"]
    for tp in ("1", "2"):
        blk, hd, step = layers["block"][tp], layers["head"][tp], layers["decode_step"][tp]
        b, k = blk["decode"]["batch"], blk["decode"]["kv_len"]
        blk.update(decode=_const(b, k, block), decode_host=_const(b, k, block_host),
                   decode_capture=_const(b, k, block_capture))
        hb, hk = hd["decode"]["batch"], hd["decode"]["kv_len"]
        hd.update(decode=_const(hb, hk, head), decode_host=_const(hb, hk, 0.0), decode_capture=_const(hb, hk, 0.0))
        sb, sk = step["launch"]["batch"], step["launch"]["kv_len"]
        values = {"launch": launch, "launch_host": launch_host, "capture": capture, "greedy": greedy,
                  "greedy_host": greedy_host, "sample": sample, "sample_host": sample_host}
        step.update({op: _const(sb, sk, v) for op, v in values.items()})
    return d


def gen_call(n=8, P=32, N=65):
    return Call("gen", "actor", "generate", ("prompts",), ("ids",), n, P + N, N)


def decode_s(d, placement, greedy=False, call=None):
    prof = profile_from_dict(json.loads(json.dumps(d)))
    return t_call(call or gen_call(), placement, SPEC, prof, CLUSTER, ModelOptions(greedy=greedy)).terms["decode_s"]


def test_a_step_costs_the_slower_of_host_and_device_with_pp_1():
    one = Placement((0,))
    L, steps = SPEC.num_layers, 64  # N = 65 new tokens: 64 decode steps
    # Host-bound: sampling's launches (2 ms + 0.2 ms) outlast the device's 4·0.1 + 0.05 + 0.01 + 0.3 ms.
    d = synthetic()
    dev = L * 0.1 + 0.05 + 0.01 + 0.3
    host = 0.2 + 2.0
    assert host > dev
    assert decode_s(d, one) == pytest.approx(steps * host * MS, rel=1e-6)
    # Device-bound: long blocks; the same host work hides behind them.
    d = synthetic(block=1.0 * MS)
    dev = L * 1.0 + 0.05 + 0.01 + 0.3
    assert dev > host
    assert decode_s(d, one) == pytest.approx(steps * dev * MS, rel=1e-6)
    # Greedy reads the greedy tables: device-bound again with short blocks (0.1 + 0.2 ms of host).
    d = synthetic()
    assert decode_s(d, one, greedy=True) == pytest.approx(steps * (L * 0.1 + 0.05 + 0.01 + 0.02) * MS, rel=1e-6)
    # Eager layers (tp > 1) put their launches on the host side: 4 · 0.6 ms + 0.2 + 2.0 ms > device time.
    d = synthetic(block_host=0.6 * MS)
    tp2 = Placement((0, 1), tp=2)
    est = decode_s(d, tp2)
    assert est >= steps * (L * 0.6 + 2.2) * MS
    assert est == pytest.approx(steps * (L * 0.6 + 2.2) * MS, rel=0.05)  # + tp collectives on the device side only


def test_a_ring_of_several_stages_adds_host_and_device():
    # pp = 2, m = 2: each slot waits for its input's control flag on the host, so D + H per slot.
    d = synthetic(block=1.0 * MS)
    p = Placement((0, 1), pp=2, num_micro_batches=2)
    prof = profile_from_dict(json.loads(json.dumps(d)))
    ct = t_call(gen_call(), p, SPEC, prof, CLUSTER, ModelOptions())
    last = 2 * 1.0 + 0.05 + 0.01 + 0.3 + 0.2 + 2.0  # 2 blocks + head + launch + sample, then the host's part
    slots = 64 * 2  # max(m, pp) slots per round
    assert ct.terms["decode_s"] >= slots * last * MS
    assert ct.terms["decode_s"] == pytest.approx(slots * last * MS, rel=0.02)  # + the p2p of b·h


def test_capture_is_paid_once_per_micro_batch_and_only_when_a_graph_is_captured():
    d = synthetic(capture=5 * MS, block_capture=2 * MS)
    prof = profile_from_dict(json.loads(json.dumps(d)))
    for m in (1, 2, 4):
        ct = t_call(gen_call(), Placement((0,), num_micro_batches=m), SPEC, prof, CLUSTER, ModelOptions())
        assert ct.terms["capture_s"] == pytest.approx(m * (5 + SPEC.num_layers * 2) * MS)
        assert ct.time_s == pytest.approx(sum(ct.terms.values()))
    # Two new tokens: one decode step, run eagerly, nothing captured.
    ct = t_call(gen_call(N=2), Placement((0,)), SPEC, prof, CLUSTER, ModelOptions())
    assert ct.terms["capture_s"] == 0.0


def test_prefill_runs_in_the_executors_groups():
    torch_transformer = pytest.importorskip("reallm.model.transformer")
    for size in (1.1, 7, 70):
        spec = preset_spec("llama", size)
        for tp in (1, 2, 8):
            for lean in (False, True):
                assert prefill_chunk_tokens(spec, tp, 2, lean) == torch_transformer.prefill_chunk_tokens(
                    spec.hidden_size, spec.intermediate_size // tp, 2, lean)
    assert prefill_chunk_tokens(preset_spec("llama", 7), 1, 2, True) < prefill_chunk_tokens(preset_spec("llama", 7), 1)
    for vocab in (256, 32000, 128256):
        assert sampling_chunk_rows(vocab, ModelOptions(), 64) == 64  # all rows at once
        assert sampling_chunk_rows(vocab, ModelOptions(lean_memory=True), 64) == max(1, (1 << 20) // vocab)
    assert prefill_groups(24, 192, 2674) == [(13 * 192, 1), (11 * 192, 1)]
    assert prefill_groups(40, 288, 2674) == [(9 * 288, 4), (4 * 288, 1)]
    assert prefill_groups(3, 5000, 668) == [(5000, 3)]  # one prompt at least
    assert prefill_groups(4, 100, 8192) == [(400, 1)]
    # The estimate follows: a group's tokens cost what the profile says, groups add up.
    prof = profile_from_dict(synthetic())
    spec = SPEC
    c = prefill_chunk_tokens(spec, 1)
    P = c // 3  # three prompts per group
    one = t_call(gen_call(n=3, P=P, N=1), Placement((0,)), spec, prof, CLUSTER).terms["prefill_s"]
    three = t_call(gen_call(n=9, P=P, N=1), Placement((0,)), spec, prof, CLUSTER).terms["prefill_s"]
    draw = 2.0 * MS  # token 0's draw, once per micro-batch: max(sample, sample_host)
    assert three - draw == pytest.approx(3 * (one - draw), rel=1e-6)


def test_version_1_profiles_load_with_version_1_estimates():
    d2 = synthetic()
    # A version-1 file: no host, capture or decode-step tables; the head's decode included the sampling.
    d1 = copy.deepcopy(d2)
    d1["version"] = 1
    layers = d1["models"][shape_key(SPEC)]["layers"]
    del layers["decode_step"]
    for kind in ("block", "head"):
        for ops in layers[kind].values():
            del ops["decode_host"], ops["decode_capture"]
    prof = profile_from_dict(copy.deepcopy(d1))
    assert "Version 1 file" in prof.notes
    assert set(prof.layers[shape_key(SPEC)]["decode_step"][1]) == set(STEP_OPS)
    # Every step is the plain sum of the layers' decode times, as version 1 estimated it.
    assert decode_s(d1, Placement((0,))) == pytest.approx(64 * (SPEC.num_layers * 0.1 + 0.05) * MS, rel=1e-6)
    assert prof.to_dict()["version"] == PROFILE_VERSION
    assert upgrade_v1(d1)["version"] == 2 and d1["version"] == 1  # the input is left alone
    with pytest.raises(UserError, match="missing op"):  # a version-2 file must have the new tables
        profile_from_dict(dict(d1, version=2))


def test_grids_read_back_from_a_profile_and_validate():
    prof = profile_from_dict(synthetic())
    g = Grids.of(prof, SPEC)
    blk = prof.layers[shape_key(SPEC)]["block"][1]
    assert g.tokens == tuple(int(v) for v in blk["forward"].y) and g.batches == tuple(int(v) for v in blk["decode"].x)
    with pytest.raises(UserError, match="strictly increasing"):
        Grids(tokens=(1.5,), seqlens=(1,), batches=(1,), kv_lens=(1,))
