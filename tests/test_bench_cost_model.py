"""The cost-model fidelity bench's CPU quick path: structure of its output, and its Kendall τ (no timing checks)."""

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_cost_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cost_model", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_kendall_tau_on_known_permutations(bench):
    tau = bench.kendall_tau
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert tau(xs, [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert tau(xs, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap among 4: 5 concordant pairs, 1 discordant, of 6
    assert tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # against a brute-force count over every permutation of 5 (no ties: τ-b = τ-a)
    for perm in itertools.permutations(range(5)):
        c = sum((perm[i] < perm[j]) - (perm[i] > perm[j]) for i in range(5) for j in range(i + 1, 5))
        assert tau(list(range(5)), list(perm)) == pytest.approx(c / 10)
    # ties: τ-b's denominator sqrt((n0 - n1)(n0 - n2)); x has one tied pair, y none: (C - D) / sqrt(5 · 6)
    assert tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(5 * 6))
    with pytest.raises(ValueError):
        tau([1, 2], [1])


def test_settings_are_moved_off_the_grid(bench):
    g = bench.Grids(seqlens=(128, 1024), tokens=(64, 256, 1024), batches=(1, 2, 4, 8), kv_lens=(128, 512))
    s, notes = bench.off_grid(bench.Setting("train", 4, 128, 2), g, 8)
    assert s.seqlen == 136 and s.seqs_per_micro_batch * s.seqlen not in g.tokens and not notes
    s, _ = bench.off_grid(bench.Setting("generate", 8, 200, 2, 16), g, 8)
    assert s.seqs_per_micro_batch not in g.batches and s.n_seqs % s.num_micro_batches == 0
    _, notes = bench.off_grid(bench.Setting("inference", 2, 2000, 1), g, 8)
    assert any("> grid" in n for n in notes)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cpu_quick_run_structure(bench, tmp_path, one_thread):
    res = bench.run_bench("cpu", quick=True, num_ranked=4, repeats=1, warmup=0)
    groups = {r.group for r in res.rows}
    assert groups == {"table", "rank_call", "rank_train", "rank_generate"}
    call = [r.setting for r in res.rows if r.group == "rank_call"]
    assert len(call) == 4 and len({(c.n_seqs, c.seqlen) for c in call}) == 1  # one call's candidates
    assert {r.setting.kind for r in res.rows if r.group == "table"} == {"generate", "inference", "train"}
    assert sum(r.group == "rank_train" for r in res.rows) == 4
    for r in res.rows:
        assert r.estimate.time_s > 0 and r.estimate.memory_bytes > 0, r.setting
        assert r.measured.error is None and r.measured.time_s > 0, r.setting
        assert r.time_error is not None and r.memory_error is None  # no memory reading on CPU
        if r.setting.kind == "train":
            assert set(r.measured.phases_s) == {"fwd_bwd_s", "optimizer_s"}
            assert r.estimate.memory_terms["activation_bytes"] > 0
        if r.setting.kind == "generate":
            assert r.measured.phases_s["prefill_s"] > 0
            assert set(r.estimate.terms) == {"prefill_s", "capture_s", "decode_s"}
    s = res.summary
    assert s["time_error"]["all"]["n"] == sum(r.group == "table" for r in res.rows)
    for kind in ("call", "train", "generate"):
        assert s["kendall_tau"][kind]["n"] == 4 and -1.0 <= s["kendall_tau"][kind]["tau"] <= 1.0
    assert set(s["targets_met"]) == {"time_median", "time_max", "memory", "kendall_tau"}
    text = bench.report(res, markdown=True)
    assert "| call | settings | est s | meas s | err % | est GiB | meas GiB | err % |" in text
    assert "Kendall tau (one train call's candidates, 4 settings)" in text
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(res.to_dict()))
    back = json.loads(out.read_text())
    assert back["info"]["profile"]["source"] in ("analytic", "measured") and len(back["rows"]) == len(res.rows)
