"""Reallocation executed by 8 gloo processes between random placement pairs: the result equals cutting
the parameters for B directly, and A→B→A (A's buffer dropped in between) returns A bit for bit."""

import multiprocessing as mp
import os
import random
import traceback

import numpy as np
import pytest
import torch

from executor.launch import free_port
from reallm.layout import cut_flat, param_table, plan_realloc
from reallm.placement import Placement
from reallm.spec import ModelSpec

SPECS = {
    "untied": ModelSpec(family="llama", num_layers=4, hidden_size=16, intermediate_size=24, num_heads=4,
                        num_kv_heads=2, head_dim=4, vocab_size=37),
    "tied": ModelSpec(family="qwen2", num_layers=3, hidden_size=16, intermediate_size=24, num_heads=4,
                      num_kv_heads=1, head_dim=4, vocab_size=40, tie_word_embeddings=True, qkv_bias=True),
}


def random_placement(rng, n_dev=8):
    while True:
        dp, tp, pp = rng.choice([1, 2, 4]), rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
        size = dp * tp * pp
        if size <= n_dev:
            break
    if rng.random() < 0.5:
        start = rng.randrange(0, n_dev - size + 1)
        devices = tuple(range(start, start + size))
    else:
        devices = tuple(rng.sample(range(n_dev), size))
    return Placement(devices, dp=dp, tp=tp, pp=pp)


def cases(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = "tied" if i % 3 == 2 else "untied"
        out.append((name, random_placement(rng), random_placement(rng)))
    return out


def full_params(spec, seed=0):
    g = np.random.default_rng(seed)
    return {p.name: g.standard_normal(p.shape).astype(np.float32) for p in param_table(spec)}


def _rank_main(rank, world, port, errq):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        from executor.realloc import run_realloc

        for name, a, b in cases():
            spec = SPECS[name]
            params = full_params(spec)

            def buf(p, spec=spec, params=params):
                return torch.from_numpy(cut_flat(spec, p, rank, params)) if rank in p.devices else None

            src = buf(a)
            dst = torch.zeros_like(buf(b)) if rank in b.devices else None  # padding stays 0
            run_realloc(plan_realloc(spec, a, b, devices_per_node=4), rank, src, dst)
            if dst is not None:
                assert torch.equal(dst, buf(b)), (name, a, b)
            back = torch.zeros_like(src) if src is not None else None
            src = None  # A's copy is gone: rebuild it from B's ranks only
            run_realloc(plan_realloc(spec, b, a, devices_per_node=4), rank, dst, back)
            if back is not None:
                assert torch.equal(back, buf(a)), (name, a, b)
        dist.destroy_process_group()
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def test_realloc_random_pairs_8_ranks():
    ctx = mp.get_context("fork")
    errq, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 8, port, errq)) for r in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not errors, errors[0][1]
    assert all(p.exitcode == 0 for p in procs)


def test_interval_helpers():
    from executor.realloc import gather_intervals, scatter_intervals

    flat = torch.arange(20.0)
    st, ln = np.array([3, 10, 0]), np.array([2, 3, 1])
    got = gather_intervals(flat, st, ln)
    assert got.tolist() == [3, 4, 10, 11, 12, 0]
    out = torch.zeros(20)
    scatter_intervals(out, st, ln, got)
    assert out[[3, 4, 10, 11, 12]].tolist() == [3, 4, 10, 11, 12] and out.sum() == 40


@pytest.mark.parametrize("spec", list(SPECS))
def test_cases_cover_overlap_and_disjoint(spec):
    cs = cases()
    assert any(set(a.devices).isdisjoint(b.devices) for _, a, b in cs)
    assert any(set(a.devices) & set(b.devices) for _, a, b in cs)
