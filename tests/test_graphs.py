"""Graphed inference forward (``reallm.model.graphs``): buckets, padding, and the padded static-buffer path
against the eager forward. On CPU the graphs run uncaptured (``capture=False``): everything but the
capture itself; on CUDA the same tests capture and replay."""

from __future__ import annotations

import random

import pytest
import torch

from reallm.model.graphs import MIN_SEQ_SLOTS, graph_bucket, padded_bounds, padded_positions
from reallm.working_set import bucket

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_bucket_rounds_up_by_at_most_an_eighth():
    prev = 0
    for n in list(range(1, 3000)) + [4480, 9216, 12345, 65537, 10 ** 6]:
        b = bucket(n)
        assert b >= n and b >= prev
        prev = b
        step = max(128, 1 << max(n.bit_length() - 4, 0))
        assert b % step == 0
        if n >= 1024:
            assert b <= n * 1.125 + 1e-9, (n, b)
    assert bucket(4480) == 4608 and bucket(9216) == 9216 and bucket(1) == 128
    assert bucket(100, 64) == 128 and bucket(768, 64) == 768


@pytest.mark.parametrize("seed", range(24))
def test_padded_bounds_keep_the_real_sequences(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    lengths = [rng.randint(1, 700) for _ in range(n)] if seed % 4 else [rng.randint(1, 700)] * n
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    b = graph_bucket(lengths)
    pb = padded_bounds(bounds, b)
    assert pb[:len(bounds)] == tuple(bounds)
    assert pb[-1] == b.tokens and len(pb) == b.seq_slots + 1
    if b.uniform:  # equal lengths: the exact shape, unpadded
        assert len(set(lengths)) == 1 and pb == tuple(bounds) and b.max_seqlen == lengths[0]
    else:
        assert b.seq_slots >= MIN_SEQ_SLOTS and b.seq_slots & (b.seq_slots - 1) == 0
    assert all(0 <= z - a <= b.max_seqlen for a, z in zip(pb, pb[1:]))
    pos = padded_positions(pb)
    for a, z in zip(pb, pb[1:]):
        assert pos[a:z].tolist() == list(range(z - a))
    with pytest.raises(ValueError, match="does not fit"):
        padded_bounds(bounds + [bounds[-1] + b.max_seqlen + 1], b)


def _model(seed: int = 3, is_critic: bool = False, graphs: bool = True):
    from executor.comm import Group
    from reallm.parallel import ParallelModel
    from reallm.parallel.groups import ParallelGroups
    from reallm.placement import Placement
    from reallm.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4,
                     num_kv_heads=2, head_dim=16, vocab_size=101, source="tiny")
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))
    pm = ParallelModel.build(None, groups, spec=spec, dtype=dtype, device=DEVICE, init_seed=seed,
                             is_critic=is_critic, compile_blocks=DEVICE == "cuda", inference_graphs=False)
    if graphs:
        pm.use_inference_graphs(capture=DEVICE == "cuda")
    return pm


def _micro_batch(lengths, vocab, gen):
    tokens = torch.randint(1, vocab, (sum(lengths),), generator=gen)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return {"tokens": tokens, "cu_seqlens": cu}


@pytest.mark.parametrize("is_critic", [False, True])
def test_graphed_forward_matches_eager(is_critic):
    """Micro-batches of several shapes, some in the same bucket (replayed), against the eager model with the
    same weights: log-probs / values of every real row agree; one graph per bucket; moving the parameters
    drops the graphs, offloading turns them off."""
    eager, graphed = _model(is_critic=is_critic, graphs=False), _model(is_critic=is_critic)
    gen = torch.Generator().manual_seed(0)
    shapes = [[5, 9, 3], [7, 7, 6], [40, 1], [17] * 8, [3] * 20, [5, 9, 2]]
    mbs = [_micro_batch(s, 101, gen) for s in shapes]
    tol = dict(rtol=1e-5, atol=1e-5) if DEVICE == "cpu" else dict(rtol=2e-2, atol=2e-2)
    want = eager.forward(mbs) if is_critic else eager.logprobs(mbs)
    buckets = [graph_bucket([int(b) - int(a) for a, b in zip(mb["cu_seqlens"], mb["cu_seqlens"][1:])]) for mb in mbs]
    # A bucket is captured the second time it is met: in the first pass only the one shared by two shapes.
    for captured in ({b for b in buckets if buckets.count(b) > 1}, set(buckets)):
        got = graphed.forward(mbs) if is_critic else graphed.logprobs(mbs)
        for w, g_ in zip(want, got):
            assert w.shape == g_.shape
            torch.testing.assert_close(g_.float(), w.float(), **tol)
        assert len(graphed.graphs) == len(captured) >= 1
        assert graphed.graphs.captures == (len(captured) if DEVICE == "cuda" else 0)
    assert len(set(buckets)) < len(shapes)
    for _ in range(2):
        graphed.graphs(mbs[0]["tokens"].to(graphed.device), mbs[0]["cu_seqlens"].tolist(), params_at=-1)
    assert len(graphed.graphs) == 1  # another parameter address: the others are gone
    graphed.offload()
    graphed.reload()
    assert graphed.graphs is None
    again = graphed.forward(mbs) if is_critic else graphed.logprobs(mbs)
    for w, g_ in zip(want, again):
        torch.testing.assert_close(g_.float(), w.float(), **tol)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_train_micro_batches_give_the_eager_gradients(checkpointing):
    """``forward_backward`` with train graphs (padded buckets; captured on CUDA) against the eager model: the
    loss and the flat fp32 gradient buffer agree over calls whose micro-batches share buckets or not."""
    from executor.comm import Group
    from reallm.model.optim import OptimizerSettings
    from reallm.parallel import ParallelModel
    from reallm.parallel.groups import ParallelGroups
    from reallm.parallel.vocab import sft_loss
    from reallm.placement import Placement
    from reallm.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4,
                     num_kv_heads=2, head_dim=16, vocab_size=101, source="tiny")
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))

    def build():
        pm = ParallelModel.build(None, groups, spec=spec, dtype=dtype, device=DEVICE, init_seed=5,
                                 optimizer=OptimizerSettings(), total_steps=10, compile_blocks=DEVICE == "cuda",
                                 gradient_checkpointing=checkpointing)
        return pm

    eager, graphed = build(), build()
    graphed.use_train_graphs(capture=DEVICE == "cuda")
    gen = torch.Generator().manual_seed(1)
    calls = [[[5, 9, 3], [7, 7, 6]], [[5, 9, 2], [17] * 8], [[17] * 8, [40, 1]]]
    tol = dict(rtol=1e-5, atol=1e-6) if DEVICE == "cpu" else dict(rtol=3e-2, atol=1e-3)
    for shapes in calls:
        mbs = []
        for lengths in shapes:
            mb = _micro_batch(lengths, 101, gen)
            mb["prompt_mask"] = torch.zeros(mb["tokens"].shape[0], dtype=torch.bool)
            mb["prompt_mask"][mb["cu_seqlens"][:-1].long()] = True
            mb["num_answer_tokens_global"] = torch.tensor(float(sum(lengths)))
            mbs.append({k: v.to(DEVICE) for k, v in mb.items()})
        stats = []
        for pm in (eager, graphed):
            pm.optimizer.zero_grad()
            stats.append(pm.forward_backward(mbs, sft_loss))
            pm.optimizer.settle_grads()
        assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-5 if DEVICE == "cpu" else 2e-2)
        torch.testing.assert_close(graphed.optimizer.grads, eager.optimizer.grads, **tol)
    assert len(graphed.train_graphs) >= 1  # a bucket met twice runs from its graph
    graphed.offload()
    graphed.reload()
    assert len(graphed.train_graphs) == 0


def test_train_graphs_only_where_the_train_call_has_its_devices_to_itself():
    """``keeps_train_resident``: a train call replays graphed micro-batches only on ranks that serve no other
    call (elsewhere its state may be offloaded between steps, and the graphs' pools would stay reserved
    through the other calls) — the planner's rule too."""
    from types import SimpleNamespace as NS

    from reallm.algorithms.base import ExperimentRuntime

    calls = [NS(name="actor_gen", role="actor"), NS(name="actor_train", role="actor"),
             NS(name="critic_train", role="critic"), NS(name="rew_inf", role="reward")]
    where = {"actor_gen": (0, 1), "actor_train": (0, 1), "critic_train": (2, 3), "rew_inf": (3,)}
    plan = NS(calls=calls, placements={k: NS(devices=v) for k, v in where.items()})

    def resident(call, rank):
        return ExperimentRuntime.keeps_train_resident(NS(plan=plan, rank=rank), call)

    assert not resident("actor_train", 0)  # actor_gen on the same devices
    assert resident("critic_train", 2)  # alone on device 2
    assert not resident("critic_train", 3)  # the reward model shares device 3
    # the same rule keeps a generation's caches and captured decode steps (``keep_decode_graphs``)
    from reallm.algorithms.base import has_devices_to_itself

    assert not has_devices_to_itself(plan, 0, "actor_gen")
    where["actor_gen"] = (4,)
    plan = NS(calls=calls, placements={k: NS(devices=v) for k, v in where.items()})
    assert has_devices_to_itself(plan, 4, "actor_gen") and resident("actor_train", 0)  # both alone now


def test_train_graphs_replace_a_bucket_only_when_another_is_met_more_often():
    """With every slot taken, a new bucket is captured only once it has been met ``REPLACE_MARGIN`` times
    more than the least met captured one (varying micro-batch sizes must not recapture every call); the
    inference graphs keep the least recently used."""
    from reallm.model.graphs import REPLACE_MARGIN, TrainGraphs

    tg = TrainGraphs(lambda x, seqs, pos: x * 2, torch.nn.Linear(2, 2), torch.device("cpu"), capture=False,
                     max_graphs=1)
    a, b = (0, 100), (0, 300)  # two micro-batch shapes in different buckets

    def meet(bounds, times=1):
        for _ in range(times):
            x = torch.randn(bounds[-1], 4)
            out = tg(x, bounds, 0)  # None: the caller runs its eager forward
            assert out is None or torch.equal(out, x * 2)
        return {k[0].tokens for k in tg._entries}

    assert meet(a) == set() and meet(a) == {bucket(100)}  # captured the second time it is met
    assert meet(b, 2) == {bucket(100)}  # met as often as the captured one: no replacement
    assert meet(b, REPLACE_MARGIN) == {bucket(100)}
    assert meet(b) == {bucket(300)}  # now met REPLACE_MARGIN + 1 times more often
    assert meet(a, 3) == {bucket(300)}
    with pytest.warns(UserWarning, match="eager from now on: test"):
        tg._disable("test")
    assert len(tg) == 0 and meet(b, 3) == set() and tg.disabled_why == "test"
