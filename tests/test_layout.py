"""Layout algebra: parameter table, tp rules, pipeline partition, shards and reallocation plans.

Parameters hold distinct values (1, 2, 3, ... across the whole model; padding is 0), so any misplaced,
missing or duplicated element changes a buffer.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import numpy as np
import pytest

from reallm.layout import (
    StageBalance,
    StagePartition,
    TpSplit,
    apply_plan,
    assemble_full,
    check_tp,
    coalesce_intervals,
    cut_flat,
    interval_indices,
    param_table,
    partition_stages,
    plan_realloc,
    realloc_traffic,
    runs_to_intervals,
    shards_of,
    tp_problems,
    tp_slice,
)
from reallm.placement import Placement
from reallm.spec import ModelSpec, preset_spec


def _spec(family="llama", layers=2, heads=8, kv=8, head_dim=2, inter=24, vocab=16, **kw) -> ModelSpec:
    return ModelSpec(family, layers, heads * head_dim, inter, heads, kv, head_dim, vocab, **kw)


SHAPES = {
    "mha": _spec(layers=3),
    "gqa4_tied_odd_vocab": _spec(kv=4, vocab=13, tie_word_embeddings=True),
    "qwen2_kv2_bias_tied": _spec("qwen2", layers=4, kv=2, vocab=11, tie_word_embeddings=True, qkv_bias=True),
    "mqa_critic": _spec(layers=1, kv=1, vocab=10, is_critic=True),
    "h6_kv2_critic_tied": _spec(
        "qwen2", layers=8, heads=6, kv=2, vocab=7, qkv_bias=True, tie_word_embeddings=True, is_critic=True
    ),
    "mistral_kv4_tied": _spec("mistral", layers=5, kv=4, vocab=9, tie_word_embeddings=True),
}


def factorisations(n: int) -> list[tuple[int, int, int]]:
    return [(dp, tp, n // (dp * tp)) for dp in range(1, n + 1) for tp in range(1, n + 1) if n % (dp * tp) == 0]


def all_placements(extra_meshes: bool) -> list[Placement]:
    """Every (dp, tp, pp) of 1..8 devices on devices 0..n-1; optionally also offset and permuted meshes."""
    rng = random.Random(0)
    out = []
    for n in range(1, 9):
        meshes = [tuple(range(n))]
        if extra_meshes:
            meshes += [tuple(range(16 - n, 16)), tuple(rng.sample(range(12), n))]
        for mesh in meshes:
            out += [Placement(mesh, dp=dp, tp=tp, pp=pp) for dp, tp, pp in factorisations(n)]
    return out


def valid(spec: ModelSpec, placements: list[Placement]) -> list[Placement]:
    return [p for p in placements if not tp_problems(spec, p.tp)]


def full_params(spec: ModelSpec) -> dict[str, np.ndarray]:
    out, start = {}, 1
    for p in param_table(spec):
        out[p.name] = np.arange(start, start + p.numel, dtype=np.float64).reshape(p.shape)
        start += p.numel
    return out


def buffers(spec: ModelSpec, placement: Placement, params) -> dict[int, np.ndarray]:
    return {d: cut_flat(spec, placement, d, params) for d in placement.devices}


# -- the parameter table and tp rules --------------------------------------------------------------


def test_param_table_names_shapes_and_count():
    spec = SHAPES["qwen2_kv2_bias_tied"]
    table = {p.name: p for p in param_table(spec)}
    assert list(table)[:5] == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
    ]
    assert table["model.layers.3.self_attn.k_proj.weight"].shape == (4, 16)
    assert table["model.layers.3.mlp.down_proj.weight"].split is TpSplit.ROW
    assert list(table)[-1] == "model.norm.weight"  # tied: no lm_head
    assert sum(p.numel for p in table.values()) == spec.num_params
    critic = {p.name: p for p in param_table(SHAPES["mqa_critic"])}
    assert critic["score.weight"].shape == (1, 16) and critic["score.bias"].shape == (1,)
    assert "lm_head.weight" not in critic and critic["score.weight"].layer == 2
    assert sum(p.numel for p in critic.values()) == SHAPES["mqa_critic"].num_params  # score.bias included
    untied = {p.name: p for p in param_table(SHAPES["mha"])}
    assert untied["lm_head.weight"].split is TpSplit.VOCAB and untied["lm_head.weight"].layer == 4


def test_kv_heads_split_and_replicated_groups():
    spec = _spec(kv=2)
    k = next(p for p in param_table(spec) if p.name.endswith("k_proj.weight"))
    # kv % tp == 0: split by heads (head_dim 2 rows each).
    assert [tp_slice(k, 2, r).box[0] for r in range(2)] == [(0, 2), (2, 4)]
    # tp % kv == 0: rank r holds head r // (tp // kv); the first rank of each group is primary.
    sl = [tp_slice(k, 8, r) for r in range(8)]
    assert [s.box[0] for s in sl] == [(0, 2)] * 4 + [(2, 4)] * 4
    assert [s.primary for s in sl] == [True, False, False, False] * 2
    assert all(s.local_shape == (2, 16) for s in sl)


def test_vocab_padding():
    spec = _spec(vocab=11)
    emb = param_table(spec)[0]
    sl = [tp_slice(emb, 4, r) for r in range(4)]
    assert [s.local_shape for s in sl] == [(3, 16)] * 4
    assert [s.box[0] for s in sl] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    # 8 ranks over 11 rows: 2 rows each, the last rank holds only padding.
    assert [tp_slice(emb, 8, r).box[0] for r in (5, 6, 7)] == [(10, 11), (11, 11), (11, 11)]


def test_invalid_tp_rejected_clearly():
    spec = SHAPES["h6_kv2_critic_tied"]  # 6 heads, 2 kv heads
    with pytest.raises(ValueError, match="num_kv_heads=2 and tp=3"):
        check_tp(spec, 3)
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of tp=4"):
        shards_of(spec, Placement((0, 1, 2, 3), tp=4), 0)
    with pytest.raises(ValueError, match="tp=3"):
        plan_realloc(spec, Placement((0,)), Placement((0, 1, 2), tp=3))
    check_tp(spec, 6)  # tp % kv == 0: replicated groups of 3
    assert tp_problems(_spec(kv=4, heads=8), 8) == []
    # every placement the exhaustive tests skip is rejected, never silently accepted
    for spec in SHAPES.values():
        for pl in all_placements(extra_meshes=False):
            if tp_problems(spec, pl.tp):
                with pytest.raises(ValueError):
                    shards_of(spec, pl, pl.devices[0])


def test_layout_imports_no_torch():
    code = "import sys, reallm.layout; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- pipeline partition ----------------------------------------------------------------------------


def test_partition_7b_balanced_and_nonempty():
    spec = preset_spec("llama", 7)
    for pp in range(1, 9):
        for balance in StageBalance:
            part = partition_stages(spec, pp, balance)
            assert part.num_stages == pp and all(len(part.blocks(s)) >= 1 for s in range(pp))
    assert partition_stages(spec, 2).bounds == (0, 16, 32)
    # LLaMA-3 8B: a 128k vocabulary weighs about 2.4 blocks. Balancing parameters gives stage 0 and
    # the last stage fewer blocks; balancing compute counts the head matmul but not the embedding lookup.
    spec = preset_spec("llama3", 8)
    assert partition_stages(spec, 4).bounds == (0, 7, 16, 25, 32)
    assert partition_stages(spec, 4, StageBalance.COMPUTE).bounds == (0, 8, 17, 26, 32)


def test_partition_layers_and_tied_copy():
    spec = SHAPES["gqa4_tied_odd_vocab"]  # 2 layers, tied
    part = partition_stages(spec, 2)
    assert part.bounds == (0, 1, 2) and part.stage_of_layer(0) == 0 and part.stage_of_layer(3) == 1
    last = shards_of(spec, Placement((0, 1, 2, 3), tp=2, pp=2), 3)
    copy = last.shards[-1]
    assert copy.name == "model.embed_tokens.weight" and copy.tied_copy and not copy.primary
    assert copy.box == ((7, 13), (0, 16)) and copy.local_shape == (7, 16)
    first = shards_of(spec, Placement((0, 1, 2, 3), tp=2, pp=2), 1)
    assert first.shards[0].name == "model.embed_tokens.weight" and first.shards[0].primary
    # pp = 1: the embedding is its own head, no copy; critic: never a copy.
    assert [s.name for s in shards_of(spec, Placement((0,)), 0).shards].count("model.embed_tokens.weight") == 1
    critic = SHAPES["h6_kv2_critic_tied"]
    assert not any(s.tied_copy for s in shards_of(critic, Placement((0, 1), pp=2), 1).shards)


def test_partition_more_stages_than_layers_and_custom():
    spec = SHAPES["mqa_critic"]  # 1 layer
    part = partition_stages(spec, 3)
    assert part.num_stages == 3 and sum(len(part.blocks(s)) for s in range(3)) == 1
    assert part.stage_of_layer(0) == 0 and part.stage_of_layer(2) == 2
    with pytest.raises(ValueError):
        StagePartition(4, (0, 0, 4))  # empty stage although pp <= num_layers
    with pytest.raises(ValueError):
        StagePartition(4, (0, 3, 2, 4))
    spec = SHAPES["mha"]
    custom = StagePartition(3, (0, 1, 3))
    a = Placement((0, 1), pp=2)
    assert [s.name for s in shards_of(spec, a, 0, custom).shards if s.name.endswith("q_proj.weight")] == [
        "model.layers.0.self_attn.q_proj.weight"
    ]
    with pytest.raises(ValueError):
        shards_of(spec, a, 0, StagePartition(3, (0, 3)))


# -- shards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_primary_shards_cover_every_element_once_per_replica(name):
    spec = SHAPES[name]
    table = param_table(spec)
    for pl in valid(spec, all_placements(extra_meshes=True)):
        counts = {(d, p.name): np.zeros(p.shape, dtype=np.int64) for d in range(pl.dp) for p in table}
        held = {(d, p.name): np.zeros(p.shape, dtype=np.int64) for d in range(pl.dp) for p in table}
        for device, c in pl.coords():
            ds = shards_of(spec, pl, device)
            offset = 0
            for s in ds.shards:
                assert s.offset == offset, (pl, device, s)  # back to back, in table order
                offset += s.num_elements
                assert all(0 <= lo <= hi for lo, hi in s.box)
                held[c.dp, s.name][s.full_slices] += 1
                if s.primary:
                    counts[c.dp, s.name][s.full_slices] += 1
            assert offset == ds.num_elements
        for key, cnt in counts.items():
            assert (cnt == 1).all(), (pl, key)
            assert (held[key] >= 1).all(), (pl, key)


# -- reallocation -----------------------------------------------------------------------------------


def test_interval_helpers():
    # Two 2x3 row blocks of a 4-column array, then a contiguous run right after the second block.
    runs = np.array([[1, 2, 3, 4], [20, 1, 5, 0], [25, 1, 2, 0]], dtype=np.int64)
    starts, lengths = runs_to_intervals(runs)
    assert starts.tolist() == [1, 5, 20] and lengths.tolist() == [3, 3, 7]
    assert interval_indices(starts, lengths).tolist() == [1, 2, 3, 5, 6, 7, *range(20, 27)]
    s, n = coalesce_intervals(np.array([0, 3, 7]), np.array([3, 3, 1]))
    assert s.tolist() == [0, 7] and n.tolist() == [6, 1]


def check_pair(spec, a, b, params, bufs_a, bufs_b, devices_per_node=4):
    plan = plan_realloc(spec, a, b, devices_per_node)
    out = apply_plan(plan, bufs_a)
    assert out.keys() == bufs_b.keys()
    for d in b.devices:
        assert np.array_equal(out[d], bufs_b[d]), (a, b, d)
    # Every element a B device needs arrives exactly once (padding never written); nothing it already
    # held under A comes from another device.
    writes = {d: np.zeros(len(bufs_b[d]), dtype=np.int64) for d in b.devices}
    for m in plan.messages:
        s_st, s_len = m.src_intervals()
        d_st, d_len = m.dst_intervals()
        assert s_len.sum() == d_len.sum() == m.num_elements > 0
        np.add.at(writes[m.dst], interval_indices(d_st, d_len), 1)
        if not m.is_local and m.dst in bufs_a:
            payload = bufs_a[m.src][interval_indices(s_st, s_len)]
            assert not np.isin(payload, bufs_a[m.dst]).any(), (a, b, m.src, m.dst)
    for d in b.devices:
        assert np.array_equal(writes[d], (bufs_b[d] != 0).astype(np.int64)), (a, b, d)
    traffic = realloc_traffic(spec, a, b, devices_per_node)
    assert traffic.elements_by_pair == plan.traffic.elements_by_pair
    if a == b:
        assert traffic.moved_bytes() == 0 and all(m.is_local for m in plan.messages)
    return out


@pytest.mark.parametrize("name", ["qwen2_kv2_bias_tied", "h6_kv2_critic_tied", "mqa_critic"])
def test_realloc_all_pairs(name):
    spec = SHAPES[name]
    params = full_params(spec)
    pls = valid(spec, all_placements(extra_meshes=False))
    bufs = {pl: buffers(spec, pl, params) for pl in pls}
    for a, b in itertools.product(pls, pls):
        check_pair(spec, a, b, params, bufs[a], bufs[b])


@pytest.mark.parametrize("name", list(SHAPES))
def test_realloc_sampled_pairs_and_round_trip(name):
    spec = SHAPES[name]
    params = full_params(spec)
    pls = valid(spec, all_placements(extra_meshes=True))
    bufs = {pl: buffers(spec, pl, params) for pl in pls}
    rng = random.Random(name)
    pairs = [(p, p) for p in pls[::5]] + [tuple(rng.sample(pls, 2)) for _ in range(120)]
    for a, b in pairs:
        out = check_pair(spec, a, b, params, bufs[a], bufs[b])
        back = apply_plan(plan_realloc(spec, b, a, 4), out)
        assert all(np.array_equal(back[d], bufs[a][d]) for d in a.devices), (a, b)
        full = assemble_full(spec, b, out, check_replicas=True)
        assert all(np.array_equal(full[k], v) for k, v in params.items()), (a, b)


def test_realloc_prefers_same_node_then_balances():
    spec = SHAPES["mha"]
    # Replica 0 on node 0 (devices 0, 1), replica 1 on node 1 (4, 5); the destination sits on node 1.
    a = Placement((0, 1, 4, 5), dp=2, tp=2)
    traffic = realloc_traffic(spec, a, Placement((6, 7), tp=2), devices_per_node=4)
    assert {s for s, _ in traffic.elements_by_pair} == {4, 5}
    # Four full replicas feeding one new device: each sends about a quarter.
    a = Placement((0, 1, 2, 3), dp=4)
    sent = realloc_traffic(spec, a, Placement((4,)), devices_per_node=8).send_bytes(dtype_bytes=1)
    largest = max(p.numel for p in param_table(spec))
    assert len(sent) == 4 and max(sent.values()) - min(sent.values()) <= largest


def test_realloc_7b_delivers_everything():
    spec = preset_spec("llama", 7)
    mesh = tuple(range(8))
    for a, b in [
        (Placement(mesh, tp=8), Placement(mesh, dp=4, pp=2)),
        (Placement(mesh, dp=2, tp=2, pp=2), Placement(mesh, tp=8)),
    ]:
        traffic = realloc_traffic(spec, a, b)
        needed = sum(s.num_real_elements for d in b.devices for s in shards_of(spec, b, d).shards)
        assert sum(traffic.elements_by_pair.values()) == needed
        # Cached, and shared across micro-batch counts (they do not change who holds what).
        a4 = Placement(a.devices, dp=a.dp, tp=a.tp, pp=a.pp, num_micro_batches=4)
        assert plan_realloc(spec, a, b) is plan_realloc(spec, a4, b)
