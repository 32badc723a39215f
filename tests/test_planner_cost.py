"""Cost model sanity: call times, memory, collectives, reallocation, transfers."""

import copy
import dataclasses
import types

import pytest

from planner.cost_model.call_time import sampling_mode, sum_over_steps_s, t_call
from planner.cost_model.collectives import all_gather_time_s, all_reduce_time_s
from planner.cost_model.memory import call_memory
from planner.cost_model.profile import PROFILE_DIR, LinkRate, load_profile
from planner.cost_model.realloc import realloc_estimate_s, realloc_time_s
from planner.cost_model.shapes import ModelOptions, max_params_per_device, seqs_per_micro_batch
from planner.cost_model.tables import candidate_meshes, enumerate_candidates, model_options
from planner.cost_model.transfer import edge_bytes
from reallm.cluster import load_cluster
from reallm.dataflow import ppo_calls
from reallm.placement import Placement
from reallm.spec import preset_spec

PROF = load_profile(str(PROFILE_DIR / "h100_analytic.json"))
NODE = load_cluster("h100")
CLUSTER16 = load_cluster("h100", n_nodes=2)
CALLS = {c.name: c for c in ppo_calls(n_seqs=128, max_prompt_len=256, max_new_tokens=256, n_minibatches=4)}
S7, S13 = preset_spec("llama", 7), preset_spec("llama", 13)


def test_collective_formulas():
    r = LinkRate(100e9, 1e-5)
    assert all_reduce_time_s(1e9, 1, r) == 0.0
    assert all_reduce_time_s(1e9, 4, r) == pytest.approx(1e-5 + 2 * 3 / 4 * 1e9 / 100e9)
    assert all_gather_time_s(1e9, 8, r) == pytest.approx(1e-5 + 7 / 8 * 1e9 / 100e9)


def test_inference_in_one_node_never_slower_with_more_dp():
    call = CALLS["ref_inf"]
    for tp in (1, 2):
        prev = float("inf")
        for n in (tp, 2 * tp, 4 * tp, 8):
            if n % tp:
                continue
            best = min(t_call(call, Placement(tuple(range(n)), n // tp, tp, 1, False, m), S7, PROF, NODE).time_s
                       for m in (1, 2, 4))
            assert best <= prev * (1 + 1e-9), (tp, n)
            prev = best


def test_static_memory_falls_with_tp_and_pp():
    call = CALLS["actor_train"]
    for spec in (S7, S13):
        prev = None
        for tp, pp in ((1, 1), (2, 1), (4, 1), (8, 1)):
            m = call_memory(call, Placement(tuple(range(tp * pp)), 1, tp, pp), spec)
            assert prev is None or m.state_bytes < prev
            prev = m.state_bytes
        prev = None
        for pp in (1, 2, 4, 8):
            m = call_memory(call, Placement(tuple(range(pp)), 1, 1, pp, False, pp), spec)
            assert prev is None or m.state_bytes < prev
            prev = m.state_bytes
        # 18 bytes per parameter (bf16 weights, fp32 grads, fp32 master and two moments); ZeRO-1 shards 12 of them
        p = Placement(tuple(range(8)), 8, 1, 1)
        n = max_params_per_device(spec, 1, 1)
        assert call_memory(call, p, spec).state_bytes == 18 * n
        assert call_memory(call, p, spec, ModelOptions(zero_stage=1)).state_bytes == pytest.approx(6 * n + 12 * n / 8)


def test_activation_memory_checkpointing_and_sequence_parallel():
    call = CALLS["actor_train"]
    p = Placement(tuple(range(8)), 1, 8, 1, False, 4)
    full = call_memory(call, p, S7, ModelOptions(gradient_checkpointing=False)).transient_bytes
    ckpt = call_memory(call, p, S7, ModelOptions(gradient_checkpointing=True)).transient_bytes
    sp = call_memory(call, Placement(tuple(range(8)), 1, 8, 1, True, 4), S7).transient_bytes
    assert sp < ckpt < full
    gen = call_memory(CALLS["actor_gen"], Placement(tuple(range(8)), 8, 1, 1), S7)
    assert gen.transient_bytes > gen.weights_bytes  # KV cache on top of its replica
    assert gen.shared_transient_bytes == gen.transient_bytes - gen.weights_bytes


def test_generation_is_prefill_plus_decode_growing_with_kv():
    call = CALLS["actor_gen"]
    ct = t_call(call, Placement(tuple(range(8)), 8, 1, 1), S7, PROF, NODE)
    assert ct.time_s == pytest.approx(ct.terms["prefill_s"] + ct.terms["capture_s"] + ct.terms["decode_s"])
    assert sum_over_steps_s(lambda k: 2 * k + 1, 10, 100) == pytest.approx(sum(2 * k + 1 for k in range(10, 110)))
    longer = CALLS["actor_gen"].__class__(**{**CALLS["actor_gen"].__dict__, "max_seqlen": 256 + 1024, "max_new_tokens": 1024})
    t_long = t_call(longer, Placement(tuple(range(8)), 8, 1, 1), S7, PROF, NODE).terms["decode_s"]
    assert t_long > 4 * ct.terms["decode_s"]  # more steps, and each step reads a longer KV cache


def test_train_terms_dp_allreduce_crosses_nodes():
    call = CALLS["actor_train"]
    inside = t_call(call, Placement(tuple(range(8)), 8, 1, 1, False, 1), S7, PROF, CLUSTER16).terms["dp_comm_s"]
    across = t_call(call, Placement(tuple(range(16)), 16, 1, 1, False, 1), S7, PROF, CLUSTER16).terms["dp_comm_s"]
    assert across > 5 * inside  # IB is 9x slower than NVLink


def test_reallocation_identical_is_free_and_estimate_matches_layout_plan():
    a = Placement(tuple(range(8)), 2, 4, 1, True, 2)
    assert realloc_time_s(S7, a, Placement(a.devices, 2, 4, 1, False, 8), NODE, PROF) == 0.0
    assert realloc_estimate_s(S7, a, a, NODE, PROF) == 0.0
    pairs = [(Placement(tuple(range(8)), 1, 8, 1), Placement(tuple(range(8)), 2, 2, 2)),
             (Placement(tuple(range(8)), 2, 4, 1), Placement(tuple(range(4)), 1, 2, 2)),
             (Placement(tuple(range(16)), 1, 4, 4), Placement(tuple(range(8, 16)), 8, 1, 1)),
             (Placement(tuple(range(8)), 1, 2, 4), Placement(tuple(range(8, 16)), 2, 4, 1))]
    for a, b in pairs:
        exact = realloc_time_s(S13, a, b, CLUSTER16, PROF)
        est = realloc_estimate_s(S13, a, b, CLUSTER16, PROF)
        assert exact > 0 and est == pytest.approx(exact, rel=0.1), (a.layout_str, b.layout_str)


def test_transfer_bytes_of_ppo_edges():
    gen = CALLS["actor_gen"]
    b = edge_bytes(("packed_input_ids", "packed_logprobs", "seq_no_eos_mask"), gen, S7)
    assert b == 128 * 512 * (8 + 4) + 128 * 1


def test_candidates_cover_small_meshes_and_fit_memory():
    meshes = candidate_meshes(CLUSTER16)
    sizes = {len(m) for m in meshes}
    assert {1, 2, 4, 8, 16} <= sizes and all(m == tuple(range(m[0], m[0] + len(m))) for m in meshes)
    cands = enumerate_candidates(CALLS["actor_train"], S7, PROF, CLUSTER16, ModelOptions(), False)
    assert cands and all(c.memory.standalone_bytes <= 0.92 * CLUSTER16.device_memory_bytes for c in cands)
    everything = enumerate_candidates(CALLS["actor_train"], S7, PROF, CLUSTER16, ModelOptions(), False,
                                      meshes=[tuple(range(8))], prune=False)
    assert any(c.placement.sequence_parallel for c in everything)
    assert len({c.placement.num_micro_batches for c in everything}) > 1
    # sequence parallel saves activation memory at the cost of twice the collective latencies
    sp = {(c.placement.dp, c.placement.tp, c.placement.num_micro_batches): c for c in everything if c.placement.sequence_parallel}
    for c in everything:
        twin = sp.get((c.placement.dp, c.placement.tp, c.placement.num_micro_batches))
        if twin is not None and not c.placement.sequence_parallel and c.placement.pp == twin.placement.pp:
            assert twin.memory.transient_bytes < c.memory.transient_bytes and twin.time_s >= c.time_s
    gen = enumerate_candidates(CALLS["actor_gen"], S7, PROF, CLUSTER16, ModelOptions(), False)
    assert any(len(c.placement.devices) <= 2 for c in gen)  # 1- and 2-device meshes are searched


def test_checkpointed_blocks_take_the_profiles_checkpointed_ops_when_it_has_them():
    import copy
    import json

    from planner.cost_model.analytic_profile import AnalyticRates, analytic_profile_dict
    from planner.cost_model.profile import profile_from_dict, shape_key
    from reallm.dataflow import Call
    from reallm.spec import ModelSpec

    spec = ModelSpec("llama", 4, 64, 128, 4, 2, 16, 256, source="tiny")
    d = analytic_profile_dict(AnalyticRates.h100(), [spec], device="test")
    blk = d["models"][shape_key(spec)]["layers"]["block"]["1"]

    def const(v):
        t = blk["forward"]
        return {"seqlen": t["seqlen"], "tokens": t["tokens"], "time_s": [[v] * len(t["tokens"]) for _ in t["seqlen"]]}

    blk.update(forward=const(1e-3), backward=const(2e-3))
    call = Call("train", "actor", "train", ("ids",), (), 8, 64, n_minibatches=2)
    p = Placement((0,), num_micro_batches=2)
    plain = profile_from_dict(copy.deepcopy(d))
    ckpt = ModelOptions(gradient_checkpointing=True)
    base = t_call(call, p, spec, plain, NODE, ckpt).terms["compute_s"]
    no_ckpt = t_call(call, p, spec, plain, NODE, ModelOptions(gradient_checkpointing=False)).terms["compute_s"]
    # Without the checkpointed ops: a forward more per block and micro-batch (2 minibatches x 2 micro-batches).
    assert base - no_ckpt == pytest.approx(2 * 2 * spec.num_layers * 1e-3)
    blk.update(forward_ckpt=const(1.5e-3), backward_ckpt=const(4e-3))
    measured = profile_from_dict(json.loads(json.dumps(d)))
    with_ops = t_call(call, p, spec, measured, NODE, ckpt).terms["compute_s"]
    # forward 1.5 instead of 1, backward (with its recomputation) 4 instead of 2 + 1 ms, per block
    assert with_ops - base == pytest.approx(2 * 2 * spec.num_layers * (0.5e-3 + 1e-3))
    assert t_call(call, p, spec, measured, NODE, ModelOptions(gradient_checkpointing=False)).terms["compute_s"] == (
        pytest.approx(no_ckpt))


def test_compiled_blocks_save_less_for_backward_and_fuse_the_log_softmax():
    from planner.cost_model.memory import head_working_bytes, layer_activation_bytes
    from planner.cost_model.shapes import blocks_compiled

    s = preset_spec("llama", 1.1)
    T = 4608
    # Measured on an H100 (memory.py docstring): 58.7 kB per token and block; eager autograd saves 94.2 kB.
    assert layer_activation_bytes(s, 1, False, T, 2, compiled=True) / T == 2 * (2 * 2048 + 4 * 2048 + 3 * 5632)
    assert layer_activation_bytes(s, 1, False, T, 2) / T == 94208
    assert blocks_compiled(ModelOptions(), 1) and not blocks_compiled(ModelOptions(), 2)
    assert not blocks_compiled(ModelOptions(compile_blocks=False), 1)
    assert not blocks_compiled(ModelOptions(dtype_bytes=4), 1)
    # Fused log-softmax: one bf16 chunk instead of three fp32 ones.
    eager, fused = head_working_bytes(s, 1, T, 2), head_working_bytes(s, 1, T, 2, fused=True)
    assert eager - fused == pytest.approx((12 - 2) * 1024 * 32000)
    from reallm.dataflow import Call

    call = Call("inf", "ref", "inference", ("ids",), ("lp",), 2, 512)  # small T: the head's chunk matters
    p = Placement((0,))
    assert call_memory(call, p, S7, ModelOptions()).transient_bytes < call_memory(
        call, p, S7, ModelOptions(compile_blocks=False)).transient_bytes


def test_generation_memory_peaks_while_decoding_or_when_the_mask_is_assembled():
    from planner.cost_model.memory import LOGITS_MASK_KEY, kv_cache_bytes
    from reallm.dataflow import Call

    s = preset_spec("llama", 1.1)
    p = Placement((0,), num_micro_batches=2)

    def gen(n, P, N, mask):
        return Call("gen", "actor", "generate", (), (LOGITS_MASK_KEY,) if mask else (), n, P + N, N)

    # Long answers, a large vocabulary mask: the end of the call (caches freed) holds 3 copies + a stack.
    m = call_memory(gen(96, 144, 176, True), p, s)
    big = m.transient_bytes - m.weights_bytes
    one = 96 * 176 * s.vocab_size
    assert big == pytest.approx(3 * one + 48 * 176 * s.vocab_size)
    # Without the mask: the KV cache (and the working set) while decoding.
    m = call_memory(gen(96, 144, 176, False), p, s)
    assert m.transient_bytes - m.weights_bytes > kv_cache_bytes(s, 1, s.num_layers, 96, 144 + 176)
    assert m.transient_bytes - m.weights_bytes < big


def test_graphed_inference_of_a_kept_frozen_model_takes_the_graphed_blocks():
    """A frozen model's inference candidate costs the profile's ``prefill_graphed`` blocks (tp = 1, compiled),
    and carries the difference to the eager time in its host load, which the simulator adds exactly when the
    model shares its devices (offloaded between calls: eager)."""
    import json

    from planner.cost_model.analytic_profile import AnalyticRates, analytic_profile_dict
    from planner.cost_model.profile import profile_from_dict, shape_key
    from planner.cost_model.realloc import host_load_time_s
    from planner.cost_model.tables import cost_candidate
    from reallm.dataflow import Call
    from reallm.spec import ModelSpec

    spec = ModelSpec("llama", 4, 64, 128, 4, 2, 16, 256, source="tiny")
    d = analytic_profile_dict(AnalyticRates.h100(), [spec], device="test")
    blk = d["models"][shape_key(spec)]["layers"]["block"]
    t = blk["1"]["prefill"]
    blk["1"]["prefill_graphed"] = dict(t, time_s=[[v / 2 for v in row] for row in t["time_s"]])  # half of eager
    prof = profile_from_dict(json.loads(json.dumps(d)))
    call = Call("ref_inf", "ref", "inference", ("ids",), ("ref_logp",), 8, 64)
    opts = ModelOptions()
    p = Placement((0,), num_micro_batches=2)
    eager = t_call(call, p, spec, prof, NODE, opts).time_s
    graphed = t_call(call, p, spec, prof, NODE, opts, graphed=True)
    blocks_eager = spec.num_layers * prof.layer_time_s(spec, "block", "prefill", 1, 4 * 64, 64)
    assert eager - graphed.time_s == pytest.approx(2 * blocks_eager / 2)
    frozen = cost_candidate(call, p, spec, prof, NODE, opts, frozen=True)
    trained = cost_candidate(call, p, spec, prof, NODE, opts, frozen=False)
    assert frozen.time_s == pytest.approx(graphed.time_s) and trained.time_s == pytest.approx(eager)
    load = host_load_time_s(frozen.memory.weights_bytes, prof, NODE)
    assert frozen.time_s + frozen.host_load_s == pytest.approx(eager + load)
    # no graphs with tp > 1, without compiled blocks, or without the table
    for other in (dict(p=Placement((0, 1), tp=2, num_micro_batches=2), opts=opts),
                  dict(p=p, opts=ModelOptions(compile_blocks=False))):
        c = cost_candidate(call, other["p"], spec, prof, NODE, other["opts"], frozen=True)
        assert c.time_s == pytest.approx(t_call(call, other["p"], spec, prof, NODE, other["opts"]).time_s)
    assert t_call(call, p, spec, PROF, NODE, opts, graphed=True).time_s == pytest.approx(
        t_call(call, p, spec, PROF, NODE, opts).time_s)


def test_graphed_train_calls_take_the_graphed_tables_and_hold_the_gradients():
    import json

    from planner.cost_model.analytic_profile import AnalyticRates, analytic_profile_dict
    from planner.cost_model.profile import profile_from_dict, shape_key
    from reallm.dataflow import Call
    from reallm.spec import ModelSpec

    spec = ModelSpec("llama", 4, 64, 128, 4, 2, 16, 256, source="tiny")
    d = analytic_profile_dict(AnalyticRates.h100(), [spec], device="test")
    layers = d["models"][shape_key(spec)]["layers"]
    t = layers["block"]["1"]["forward"]

    def const(v):
        return {"seqlen": t["seqlen"], "tokens": t["tokens"], "time_s": [[v] * len(t["tokens"]) for _ in t["seqlen"]]}

    layers["block"]["1"].update(train_graphed=const(1e-3), train_graphed_ckpt=const(2e-3))
    prof = profile_from_dict(json.loads(json.dumps(d)))
    call = Call("actor_train", "actor", "train", ("ids",), (), 8, 64, n_minibatches=1)
    p = Placement((0,), num_micro_batches=2)
    T = 4 * 64
    edges = sum(prof.layer_time_s(spec, k, op, 1, T, 64) for k in ("embedding", "head") for op in ("forward", "backward"))
    for ckpt, per_block in ((False, 1e-3), (True, 2e-3)):
        opts = ModelOptions(gradient_checkpointing=ckpt, train_graphs=True)
        got = t_call(call, p, spec, prof, NODE, opts).terms["compute_s"]
        assert got == pytest.approx(2 * (spec.num_layers * per_block + edges))
        eager = ModelOptions(gradient_checkpointing=ckpt, train_graphs=False)
        assert t_call(call, p, spec, prof, NODE, eager).terms["compute_s"] != pytest.approx(got)
        extra = call_memory(call, p, spec, opts).transient_bytes - call_memory(call, p, spec, eager).transient_bytes
        assert extra == pytest.approx(2 * max_params_per_device(spec, 1, 1))  # d·P static gradients
    # The candidate: graphed time, and eager − graphed as host load (the simulators add it exactly where the
    # call shares its devices, where the executor runs it eager), whatever the memory policy.
    from planner.cost_model.tables import cost_candidate

    layers["block"]["1"].update(train_graphed=const(1e-9), train_graphed_ckpt=const(2e-9))  # faster than eager
    prof = profile_from_dict(json.loads(json.dumps(d)))
    for policy in (dict(offload_train_state=True), dict(offload_train_state=False),
                   dict(offload_train_state=False, lean_memory=True)):
        opts = ModelOptions(train_graphs=True, **policy)
        c = cost_candidate(call, p, spec, prof, NODE, opts, frozen=False)
        graphed = t_call(call, p, spec, prof, NODE, opts).time_s
        eager = t_call(call, p, spec, prof, NODE, dataclasses.replace(opts, train_graphs=False)).time_s
        assert c.time_s == pytest.approx(graphed) and graphed != pytest.approx(eager)
        assert eager > graphed and c.host_load_s == pytest.approx(eager - graphed)
        # its memory as run eager: the graphs' pools exist only where the call is alone (checked at capture)
        assert c.memory == call_memory(call, p, spec, dataclasses.replace(opts, train_graphs=False))
    # not graphed with pp > 1 or without compiled blocks: the eager estimate
    for q, o in ((Placement((0, 1), pp=2, num_micro_batches=2), ModelOptions(train_graphs=True)),
                 (p, ModelOptions(train_graphs=True, compile_blocks=False))):
        plain = dataclasses.replace(o, train_graphs=False)
        assert t_call(call, q, spec, prof, NODE, o).time_s == pytest.approx(t_call(call, q, spec, prof, NODE, plain).time_s)


def test_generation_candidate_charges_its_capture_only_where_it_shares_its_devices():
    """A generation call captures its decode step once per run where it has its devices to itself (the
    executor keeps caches and graphs: ``DecodePool``), at every call where it shares them: the candidate's
    time leaves the capture out and its host load (added by the simulators on shared devices) carries it."""
    from planner.cost_model.analytic_profile import AnalyticRates, analytic_profile_dict
    from planner.cost_model.profile import profile_from_dict
    from planner.cost_model.tables import cost_candidate
    from reallm.dataflow import Call
    from reallm.spec import ModelSpec

    spec = ModelSpec("llama", 4, 64, 128, 4, 2, 16, 256, source="tiny")
    prof = profile_from_dict(analytic_profile_dict(AnalyticRates.h100(), [spec], device="test"))
    opts = ModelOptions()
    for new, tp in ((32, 1), (32, 2), (2, 1)):
        call = Call("actor_gen", "actor", "generate", ("prompts",), ("ids",), 8, 96, max_new_tokens=new)
        p = Placement(tuple(range(tp)), tp=tp)
        ct = t_call(call, p, spec, prof, NODE, opts)
        cand = cost_candidate(call, p, spec, prof, NODE, opts, frozen=False)
        capture = ct.terms["capture_s"]
        assert (capture > 0) == (new >= 3)  # (DecodeRunner: step 1 eager, step 2 captured)
        assert cand.time_s == pytest.approx(ct.time_s - capture)
        assert cand.host_load_s == pytest.approx(capture)
        assert dict(cand.terms)["capture_s"] == 0.0


def test_unfiltered_sampling_reads_the_plain_tables_and_old_profiles_fall_back():
    call = dataclasses.replace(CALLS["actor_gen"], max_new_tokens=64)
    p = Placement(tuple(range(8)), 8, 1, 1, False, 1)
    filtered = ModelOptions(filtered_sampling=True)
    plain = ModelOptions(filtered_sampling=False)
    assert sampling_mode(plain, PROF, S7, 1) == "sample_plain" and sampling_mode(filtered, PROF, S7, 1) == "sample"
    assert sampling_mode(ModelOptions(greedy=True, filtered_sampling=False), PROF, S7, 1) == "greedy"
    t_filtered = t_call(call, p, S7, PROF, NODE, filtered).time_s
    t_plain = t_call(call, p, S7, PROF, NODE, plain).time_s
    # no sort over the vocabulary: per step the difference is the two tables' (device-bound at tp 1)
    b = seqs_per_micro_batch(call, p)
    per_step = (PROF.decode_time_s(S7, "decode_step", 1, b, 0, "sample")
                - PROF.decode_time_s(S7, "decode_step", 1, b, 0, "sample_plain"))
    assert per_step > 0 and t_plain < t_filtered
    # a profile without the plain tables (made before them) prices such calls as filtered sampling
    old = copy.deepcopy(PROF)
    for tps in old.layers.values():
        for ops in tps["decode_step"].values():
            ops.pop("sample_plain"), ops.pop("sample_plain_host")
    assert sampling_mode(plain, old, S7, 1) == "sample"
    assert t_call(call, p, S7, old, NODE, plain).time_s == pytest.approx(t_filtered)


def test_model_options_read_the_sampling_filter_from_the_experiment():
    def exp(**gen):
        return types.SimpleNamespace(kind="ppo", config=types.SimpleNamespace(ppo=types.SimpleNamespace(**gen)))

    assert model_options(exp(greedy=False, top_k=200, top_p=0.9), "actor").filtered_sampling
    assert model_options(exp(greedy=False, top_k=0, top_p=0.95), "actor").filtered_sampling
    assert not model_options(exp(greedy=False, top_k=0, top_p=1.0), "actor").filtered_sampling
    assert model_options(exp(greedy=True), "actor").filtered_sampling  # unknown filters: assume the sort


def test_stream_step_tables_price_a_fitting_generation_and_nothing_else():
    """With the optional stream tables (an sm_90 profile, tp = pp = 1, ≤ 64 sequences a micro-batch, a shape
    that fits), a generate call's decode steps are Σ_blocks stream_decode + stream_launch + the draw, and its
    one-off cost the stream captures; without the tables, off sm_90, at tp 2 or past 64 sequences the
    library tables price it as before."""
    import json

    from planner.cost_model.analytic_profile import AnalyticRates, analytic_profile_dict
    from planner.cost_model.profile import profile_from_dict, shape_key
    from reallm.dataflow import Call
    from reallm.spec import ModelSpec

    spec = ModelSpec("llama", 4, 256, 384, 4, 2, 64, 512, source="tiny")  # fits: head 64, 2 heads per kv head
    d = analytic_profile_dict(AnalyticRates.h100(), [spec], device="NVIDIA H100 80GB HBM3")
    base = profile_from_dict(json.loads(json.dumps(d)))
    layers = d["models"][shape_key(spec)]["layers"]

    def const(v):
        return {"batch": [1, 64], "kv_len": [128, 4096], "time_s": [[v, v], [v, 2 * v]]}

    layers["block"]["1"].update(stream_decode=const(1e-4), stream_capture=const(1e-3))
    layers["decode_step"]["1"].update(stream_launch=const(5e-5), stream_launch_host=const(1e-6),
                                      stream_capture=const(2e-3))
    prof = profile_from_dict(json.loads(json.dumps(d)))
    call = Call("actor_gen", "actor", "generate", ("prompts",), ("seq",), 32, 64, max_new_tokens=9)
    p = Placement((0,))
    on, off = ModelOptions(greedy=True, stream_decode=True), ModelOptions(greedy=True, stream_decode=False)
    t = t_call(call, p, spec, prof, NODE, on)
    P = 64 - 9  # prompt_len: max_seqlen − max_new_tokens
    draw = prof.decode_time_s(spec, "decode_step", 1, 32, 0, "greedy")
    steps = sum(4 * 1e-4 + 5e-5 + draw for _ in range(P, P + 8))  # the table is flat at 32 rows, K < 4096
    assert t.terms["decode_s"] == pytest.approx(steps)
    assert t.terms["capture_s"] == pytest.approx(4 * 1e-3 + 2e-3)
    library = t_call(call, p, spec, base, NODE, on)
    for other in (t_call(call, p, spec, prof, NODE, off), t_call(call, Placement((0, 1), tp=2), spec, prof, NODE, on)):
        assert other.terms["decode_s"] != pytest.approx(steps)
    assert t_call(call, p, spec, prof, NODE, off).time_s == pytest.approx(t_call(call, p, spec, base, NODE, off).time_s)
    assert library.time_s == pytest.approx(t_call(call, p, spec, base, NODE, off).time_s)
    big = dataclasses.replace(call, n_seqs=128)  # 128 sequences in one micro-batch: past the kernel's 64 rows
    assert t_call(big, p, spec, prof, NODE, on).time_s == pytest.approx(t_call(big, p, spec, base, NODE, on).time_s)
