"""The distributed reallocation bench on CPU: its fill agrees with cutting full parameters, 8 gloo ranks
run the seed's pairs and verify them, and one corrupted element fails the run on every rank."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reallm.layout import cut_flat, param_table, shards_of
from reallm.placement import Placement
from tests.dist_harness import WorkerError, run_workers

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_realloc_dist.py"
LAYOUTS = ("tp8", "pp2dp4", "tp4pp2", "tp2pp2dp2", "dp8")


def _load():
    spec = importlib.util.spec_from_file_location("bench_realloc_dist", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def full_params(spec) -> dict[str, np.ndarray]:
    """Full parameters read off one device holding everything (tp = pp = dp = 1: no padding)."""
    flat = bench.fill_buffer(spec, Placement((0,)), 0, torch.float32, torch.device("cpu")).numpy()
    return {
        s.name: flat[s.offset : s.offset + s.num_elements].reshape(s.local_shape)
        for s in shards_of(spec, Placement((0,)), 0).shards
    }


@pytest.mark.parametrize("critic", [False, True])
def test_fill_equals_cut_from_full_params(critic):
    spec = bench.TINY.with_critic(critic)
    full = full_params(spec)
    assert set(full) == {p.name for p in param_table(spec)}
    for name, x in full.items():  # a real hash of the coordinates: (almost) no repeats, never 0
        assert np.all(x != 0) and len(np.unique(x)) >= 0.9 * x.size, name
    for text in LAYOUTS:
        p = bench.parse_layout(text)
        for d in p.devices:
            got = bench.fill_buffer(spec, p, d, torch.float32, torch.device("cpu")).numpy()
            np.testing.assert_array_equal(got, cut_flat(spec, p, d, full), err_msg=f"{text} device {d}")


def test_bf16_fill_is_exact_and_nonzero():
    idx = torch.arange(100_000)
    v16 = bench.coord_values(3, idx, torch.bfloat16)
    v32 = bench.coord_values(3, idx, torch.float32)
    assert torch.all(v16 != 0) and torch.all(torch.isfinite(v16.float()))
    assert torch.equal(v16.float().bfloat16().view(torch.int16), v16.view(torch.int16))
    assert len(torch.unique(v16.float())) > 2000 and torch.all(v32 != 0)


def test_parse_pairs_and_layouts():
    pairs = bench.parse_pairs("seed", bench.TINY)
    assert [(p.role, p.a, p.b) for p in pairs] == [
        ("actor", Placement(tuple(range(8)), tp=8), Placement(tuple(range(8)), dp=4, pp=2)),
        ("critic", Placement(tuple(range(8)), tp=8), Placement(tuple(range(8)), tp=4, pp=2)),
    ]
    assert pairs[1].spec.is_critic and not pairs[0].spec.is_critic
    with pytest.raises(ValueError):
        bench.parse_layout("tp8x")
    with pytest.raises(ValueError):
        bench.parse_pairs("ref:tp8>tp4", bench.TINY)


def _bench_rank(rank, world, argv):
    return bench.run(bench.parse_args(argv), rank)


def test_bench_8_ranks_seed_pairs():
    results = run_workers(8, _bench_rank, ["--iters", "2"], timeout_s=60)
    res = results[0]
    assert [(r["role"], r["src"], r["dst"]) for r in res["pairs"]] == [
        ("actor", "tp8", "pp2dp4"),
        ("actor", "pp2dp4", "tp8"),
        ("critic", "tp8", "tp4pp2"),
        ("critic", "tp4pp2", "tp8"),
    ]
    for r in res["pairs"]:
        assert r["verified"] and len(r["times_s"]) == 2 and r["moved_bytes"] > 0
        assert sum(r["sent_bytes"].values()) == sum(r["recv_bytes"].values()) == r["moved_bytes"]
        assert r["bottleneck_GBps"] > 0 and r["link_fraction"] > 0
    assert set(res["link"]) == {"p2p", "bidir", "ring", "all_pairs"}
    assert "| actor | tp8 -> pp2dp4 |" in bench.format_table(res)
    # every rank saw the same maxima over ranks
    assert all(r["pairs"][0]["times_s"] == res["pairs"][0]["times_s"] for r in results)


def test_bench_fails_on_a_corrupted_element():
    with pytest.raises(WorkerError, match="elements differ from the expected buffer"):
        run_workers(
            8, _bench_rank, ["--iters", "1", "--pairs", "actor:tp8>pp2dp4", "--corrupt-rank", "5"], timeout_s=60
        )
