"""reallm.parallel without processes: schedules (and their deadlock checker), buckets, padding, the flat AdamW
and the vocab-parallel log-probs on one rank against the single-process code."""

from __future__ import annotations

import random

import pytest
import torch

from executor.comm import Group
from reallm.layout.shards import DeviceShards, Shard
from reallm.model.optim import MixedPrecisionAdamW, OptimizerSettings
from reallm.parallel.generate import (
    TokReceives,
    ring_needs,
    ring_recv,
    ring_schedule,
    ring_send,
    ring_slots,
    slot_id,
    split_prompts,
)
from reallm.parallel.groups import AxisGroup, ParallelGroups, tied_embedding_rank_sets
from reallm.parallel.optim import FlatAdamW, make_buckets, owned_runs
from reallm.parallel.pipeline import Msg, PipeOp, check_schedule, forward_schedule, one_f_one_b_schedule
from reallm.parallel.tensor import pad_for_sp
from reallm.parallel.vocab import LogitsShard
from reallm.placement import Placement

torch.set_num_threads(1)
ONE = AxisGroup(Group((0,), None), (0,), 0)


# -- schedules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
def test_one_f_one_b_is_deadlock_free_and_bounded(p):
    for m in range(0, 10):
        sched = one_f_one_b_schedule(p, m)
        check_schedule(sched)
        for s, ops in enumerate(sched):
            assert [o.mb for o in ops if o.kind == "fwd"] == list(range(m))
            assert [o.mb for o in ops if o.kind == "bwd"] == list(range(m))
            alive = peak = 0
            for o in ops:
                alive += {"fwd": 1, "bwd": -1}.get(o.kind, 0)
                peak = max(peak, alive)
            assert peak <= min(p - s, m), (s, peak)  # 1F1B's activation memory bound
        check_schedule(forward_schedule(p, m), training=False)


def test_checker_finds_deadlocks_and_mismatches():
    # Both stages send first, each waiting for the other to receive: the classic unbatched deadlock.
    bad = [[PipeOp("fwd", 0), PipeOp("comm", sends=(Msg("act", 0, 1),)), PipeOp("comm", recvs=(Msg("grad", 0, 1),)),
            PipeOp("bwd", 0)],
           [PipeOp("comm", sends=(Msg("grad", 0, 0),)), PipeOp("comm", recvs=(Msg("act", 0, 0),)),
            PipeOp("fwd", 0), PipeOp("bwd", 0)]]
    with pytest.raises(ValueError, match="deadlock|before"):
        check_schedule(bad)
    swapped = forward_schedule(2, 2)
    swapped[1][0] = PipeOp("comm", recvs=(Msg("act", 1, 0),))
    with pytest.raises(ValueError, match="expects|sends"):
        check_schedule(swapped, training=False)


def test_generation_ring_is_deadlock_free():
    rng = random.Random(0)
    for p in range(1, 6):
        for g in range(1, 7):
            for _ in range(6):
                t_end = [rng.randint(-1, 5) for _ in range(g)]
                check_schedule(ring_schedule(p, t_end), training=False, needs=ring_needs(p, g))


def _naive_ring(p: int, t_end: list[int]):
    """The ring with stage 0 receiving tokens only when it consumes them (what TokReceives avoids)."""
    G = len(t_end)
    slots = ring_slots(p, t_end)
    out = []
    for s in range(p):
        ops = [PipeOp("comm", recvs=(ring_recv(s, p, G, -1, 0),))] if s > 0 else []
        for i, (t, g, done) in enumerate(slots):
            ops.append(PipeOp("fwd", slot_id(t, g, G)))
            send = ring_send(s, p, G, t, g, done)
            recv = ring_recv(s, p, G, *slots[i + 1][:2]) if i + 1 < len(slots) else None
            if send or recv:
                ops.append(PipeOp("comm", sends=(send,) if send else (), recvs=(recv,) if recv else ()))
        out.append(ops)
    return out


def test_posting_token_receives_late_deadlocks():
    with pytest.raises(ValueError, match="deadlock"):
        check_schedule(_naive_ring(2, [3, 3, 3, 3]), training=False, needs=ring_needs(2, 4))
    assert TokReceives(2, 4).after((-1, 0, False), (-1, 1)) == []  # P - 1 = 1 slot behind: nothing yet


def test_ring_slots_and_prompt_split():
    assert ring_slots(1, [0, -1]) == [(-1, 0, False), (-1, 1, False), (0, 0, False)]
    assert ring_slots(2, [0, -1]) == [(-1, 0, False), (-1, 1, False), (0, 0, False), (0, 1, True), (1, 0, True)]
    assert [list(r) for r in split_prompts(5, 3)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in split_prompts(2, 4)] == [[0], [1]]


# -- small pieces -------------------------------------------------------------------------------------------


def test_buckets_and_runs():
    buckets, n = make_buckets(1001, 256, 4)
    assert buckets[0].start == 0 and all(b.numel % 4 == 0 for b in buckets) and n == buckets[-1].stop >= 1001
    assert all(x.stop == y.start for x, y in zip(buckets, buckets[1:]))
    shards = DeviceShards(0, None, (Shard("a", ((0, 10),), (10,), 0, True), Shard("b", ((0, 2), (0, 5)), (2, 5), 10, False),
                                    Shard("c", ((0, 3), (0, 3)), (3, 3), 20, True)), 29)
    assert owned_runs(shards, [(0, 32)], lambda s: s.primary) == [(0, 10), (20, 29)]
    assert owned_runs(shards, [(8, 12), (24, 32)], lambda s: len(s.local_shape) == 2) == [(2, 9)]


def test_sequence_parallel_padding():
    tok, cu = torch.arange(7), torch.tensor([0, 3, 7], dtype=torch.int32)
    t2, cu2, n = pad_for_sp(tok, cu, 7, 4)
    assert n == 8 and cu2.tolist() == [0, 3, 7, 8] and t2.tolist() == list(range(7)) + [0]
    assert pad_for_sp(tok, cu, 7, 7)[2] == 7


def test_groups():
    p = Placement(tuple(range(16)), dp=2, tp=2, pp=4)
    assert tied_embedding_rank_sets(p) == [(0, 12), (1, 13), (2, 14), (3, 15)]
    assert tied_embedding_rank_sets(Placement((0, 1), pp=2)) == []
    rev = Placement((3, 2, 1, 0), tp=2, pp=2)

    class Ctx:
        placement, rank = rev, 2
        coord = rev.coord(2)
        tp, pp, dp = Group((2, 3), None), Group((0, 2), None), Group((2,), None)
        replica = mesh = Group((0, 1, 2, 3), None)

    g = ParallelGroups.from_context(Ctx())
    assert g.tp.axis_ranks == (3, 2) and g.tp.index == 1 and not g.tp.in_axis_order
    assert g.stage_rank(0) == 2 and g.stage_rank(1) == 0 and g.is_first_stage and g.tied is None


# -- numerics on one rank -----------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_vocab_logprobs_on_one_rank_equal_functional(padded):
    from reallm.algorithms.functional import gather_logprobs

    g = torch.Generator().manual_seed(0)
    V, W = 37, 40 if padded else 37
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    tokens = torch.randint(0, V, (14,), generator=g)
    logits = torch.randn(14, W, generator=g, dtype=torch.float64).float()
    mask = torch.rand(14, V, generator=g) < 0.3
    mask[torch.arange(13), tokens[1:]] = False
    x1 = logits.clone().requires_grad_(True)
    x2 = logits[:, :V].clone().requires_grad_(True)
    got = LogitsShard(x1, 0, V, ONE).logprobs(tokens, cu, temperature=0.7, logits_mask=mask, chunk_rows=3)
    want = gather_logprobs(x2, tokens, cu, temperature=0.7, logits_mask_TV=mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    w = torch.randn(got.shape, generator=g)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(x1.grad[:, :V], x2.grad, atol=1e-6, rtol=1e-6)
    assert not x1.grad[:, V:].any()
    rows = LogitsShard(logits, 0, V, ONE).row_logprobs(tokens, cu)
    assert rows.shape == (14,) and rows[4] == 0 and rows[5] == 0 and rows[13] == 0


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_flat_adamw_equals_mixed_precision_adamw(clip):
    g = torch.Generator().manual_seed(1)
    settings = OptimizerSettings(lr=1e-2, weight_decay=0.1, warmup_steps_proportion=0.3, gradient_clipping=clip)
    shapes = {"w": (4, 3), "b": (5,), "m": (2, 6)}
    params = {k: torch.nn.Parameter(torch.randn(v, generator=g)) for k, v in shapes.items()}
    ref = {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}
    shards, off = [], 0
    for k, v in shapes.items():
        shards.append(Shard(k, tuple((0, n) for n in v), v, off, True))
        off += int(torch.tensor(v).prod())
    ds = DeviceShards(0, None, tuple(shards), off)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    opt = FlatAdamW(flat, ds, settings, 10, ONE)
    ref_opt = MixedPrecisionAdamW(ref.items(), settings, 10)
    for _ in range(3):
        grads = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
        opt.grads.copy_(torch.cat([x.reshape(-1) for x in grads.values()]))
        for k, p in ref.items():
            p.grad = grads[k].clone()
        st, ref_st = opt.step(lambda t: t), ref_opt.step()
        assert st["grad_norm"] == pytest.approx(ref_st["grad_norm"], rel=1e-6) and st["lr"] == ref_st["lr"]
        torch.testing.assert_close(flat, torch.cat([p.detach().reshape(-1) for p in ref.values()]), atol=1e-6,
                                   rtol=1e-6)


# -- one process, world size 1: the trivially correct path ------------------------------------------------


def _single(placement: Placement) -> ParallelGroups:
    one = lambda ranks: Group(tuple(ranks), None)  # noqa: E731 - every group has one member
    return ParallelGroups.build(placement, 0, one)


def test_world_size_one_equals_the_plain_model(tiny_assets):
    from reallm.model import load_hf_model, sft_micro_batch
    from reallm.model.losses import sft_loss as plain_sft_loss
    from reallm.model.train import train_step
    from reallm.parallel import ParallelModel, sft_loss

    path = tiny_assets["qwen2"]
    settings = OptimizerSettings(lr=1e-3, warmup_steps_proportion=0.0)
    pm = ParallelModel.build(path, _single(Placement((0,))), optimizer=settings, total_steps=5)
    plain = load_hf_model(path)
    opt = MixedPrecisionAdamW(plain.hf_named_parameters(), settings, 5)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 384, (n,), generator=g).tolist() for n in (6, 9, 4)]
    mbs = [sft_micro_batch(seqs[:2], [2, 3], 13), sft_micro_batch(seqs[2:], [1], 13)]
    (out,) = pm.forward(mbs[:1])
    torch.testing.assert_close(out.local_logits(), plain(mbs[0]["tokens"], mbs[0]["cu_seqlens"]), atol=0, rtol=0)
    got, want = pm.train_step(mbs, sft_loss), train_step(plain, opt, mbs, plain_sft_loss)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    for name, p in plain.hf_named_parameters():
        torch.testing.assert_close(pm.local_tensor(name), p.detach(), atol=1e-6, rtol=1e-6)
    # No checkpoint: shapes from the spec, weights drawn locally.
    spec_only = ParallelModel.build(None, _single(Placement((0,))), spec=pm.spec, init_seed=3)
    assert spec_only.forward(mbs[:1])[0].local_logits().isfinite().all() and spec_only.flat_parameters().any()


@pytest.mark.parametrize("chunk_rows", [1, 3, 1024])
def test_logprobs_from_hidden_states_equal_those_from_the_logits(chunk_rows):
    """An inference ``LogitsShard`` holds normed hidden states and the head's rows: its log-probs (logits made
    a chunk at a time) equal those of the whole logits, padded vocabulary and logits mask included."""
    g = torch.Generator().manual_seed(4)
    V, W, H = 37, 40, 8
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    tokens = torch.randint(0, V, (14,), generator=g)
    hidden = torch.randn(14, H, generator=g, dtype=torch.float64).float()
    head = torch.randn(W, H, generator=g, dtype=torch.float64).float()
    head[V:] = 0  # padded rows of the vocabulary
    mask = torch.rand(14, V, generator=g) < 0.3
    mask[torch.arange(13), tokens[1:]] = False
    lazy = LogitsShard(None, 0, V, ONE, hidden=hidden, head_weight=head)
    whole = LogitsShard(hidden @ head.t(), 0, V, ONE)
    assert lazy.num_tokens == 14
    torch.testing.assert_close(lazy.local_logits(), whole.logits)
    for kw in (dict(), dict(temperature=0.7, logits_mask=mask)):
        torch.testing.assert_close(lazy.logprobs(tokens, cu, chunk_rows=chunk_rows, **kw),
                                   whole.logprobs(tokens, cu, **kw), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lazy.full(), whole.full())
