"""The profiler (``executor/profiler.py``, ``planner profile``) on CPU fp32 with a tiny model and grid:
the JSON it writes loads, covers every op at every profiled tp without analytic fallback, records how it
was made, marks unmeasured collectives as assumed, and feeds the cost model. No timing assertions:
performance is checked by benchmarks, never unit tests."""

import json

import pytest
import torch

from executor.profiler import (
    CPU_QUICK_GRIDS,
    AnalyticRates,
    Grids,
    ProfileSettings,
    collectives_table,
    drop_bumps,
    fill_table,
    isotonic,
    measure_collectives,
    monotone,
    profile_models,
)
from planner.cli import main as planner_main
from planner.cost_model import profile as profile_mod
from planner.cost_model.call_time import t_call
from planner.cost_model.profile import (
    GRAPHED_OPS,
    LAYER_KINDS,
    OPTIONAL_OPS,
    PROFILE_DIR,
    REQUIRED_OPS,
    STREAM_BLOCK_OPS,
    STREAM_STEP_OPS,
    default_profile,
    load_profile,
    profile_from_dict,
    shape_key,
)
from reallm import working_set
from reallm.cluster import load_cluster
from reallm.dataflow import Call
from reallm.errors import UserError
from reallm.placement import Placement
from reallm.spec import ModelSpec
from tests.dist_harness import run_workers

TINY = ModelSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=101, source="tiny")  # 101: the vocabulary is padded for tp = 2
FAST = ProfileSettings(device="cpu", grids=CPU_QUICK_GRIDS, show_progress=False, point_target_s=0.002,
                       min_repeats=1, max_repeats=2)
RUN_FIELDS = ("command", "date_utc", "device", "torch", "cuda", "git_commit", "grids", "models", "tp", "skipped",
              "filled", "adjusted", "errors", "decode", "sampling")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_profile():
    return profile_models([TINY], [1, 2, 4], FAST, command="test")


def _assert_covers(prof, spec, tps):
    key = shape_key(spec)
    for kind in LAYER_KINDS:
        for tp in tps:
            # the profiler also measures the optional ops (checkpointed blocks); graphed ones on CUDA only, and
            # the stream step's only on sm_90 for shapes that fit
            on_cuda = prof.dtype == "bf16"  # (the profiler measures bf16 on CUDA, fp32 on CPU)
            optional = set(OPTIONAL_OPS.get(kind, ())) - (set() if on_cuda and tp == 1 else set(GRAPHED_OPS))
            if not (on_cuda and tp == 1 and working_set.stream_decode_device(prof.device)
                    and working_set.stream_decode_unfit(spec, 1) is None):
                optional -= set(STREAM_BLOCK_OPS + STREAM_STEP_OPS)
            assert set(prof.layers[key][kind][tp]) == set(REQUIRED_OPS[kind]) | optional, (kind, tp)
    for tp in tps:
        for kind in ("embedding", "block", "head", "score_head"):
            assert prof.layer_time_s(spec, kind, "forward", tp, 100, 32) > 0
        assert prof.decode_time_s(spec, "block", tp, 3, 40) > 0
        assert prof.layer_time_s(spec, "block", "backward_ckpt", tp, 100, 32) > 0
    assert prof.fallbacks == []


def test_profile_covers_every_op_without_fallback(tiny_profile):
    d = tiny_profile
    prof = profile_from_dict(json.loads(json.dumps(d)))
    assert prof.source == "measured" and prof.device == "cpu" and prof.dtype == "fp32"
    assert not prof.includes_tp_comm
    _assert_covers(prof, TINY, (1, 2, 4))
    assert prof.optimizer_time_s_per_param > 0
    (run,) = prof.runs
    assert all(k in run for k in RUN_FIELDS)
    assert run["models"] == [shape_key(TINY)] and run["tp"] == [1, 2, 4] and run["decode"] == "eager"
    assert run["errors"] == [] and run["skipped"] == []
    assert {p["tp"] for p in run["optimizer_points"]} == {1, 2, 4}
    # One process, no GPU: every collective and host entry is the analytic one, marked assumed.
    assert all(r.assumed for tab in prof.collectives.values() for r in tab.values())
    assert set(prof.collectives) == {"nvlink", "ib", "host"}
    # The schema's tables: token ops that do not depend on the sequence length have one seqlen row.
    layers = d["models"][shape_key(TINY)]["layers"]
    assert layers["block"]["1"]["forward"]["seqlen"] == list(CPU_QUICK_GRIDS.seqlens)
    assert len(layers["head"]["2"]["decode"]["kv_len"]) == 1
    # On a CPU the host does the work: host and capture tables are 0, device tables hold the wall time.
    for tp in ("1", "2", "4"):
        step = layers["decode_step"][tp]
        assert all(v == 0.0 for op in ("launch_host", "capture", "greedy_host", "sample_host")
                   for row in step[op]["time_s"] for v in row)
        assert all(v > 0.0 for op in ("launch", "greedy", "sample") for row in step[op]["time_s"] for v in row)
        for kind in ("block", "head"):
            assert all(v == 0.0 for op in ("decode_host", "decode_capture")
                       for row in layers[kind][tp][op]["time_s"] for v in row)
    assert run["greedy_sampling"]["greedy"] and not run["sampling"]["greedy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_cuda_profile_times_the_graphed_block_tables():
    """On CUDA with compiled blocks the tp = 1 entry has the graphed tables (``prefill_graphed``,
    ``train_graphed[_ckpt]``: captured and timed without error, the device usable afterwards), tp = 2 none;
    graphed train calls are then estimated from them."""
    from executor.profiler import CUDA_QUICK_GRIDS
    from planner.cost_model.shapes import ModelOptions

    settings = ProfileSettings.for_device("cuda", grids=CUDA_QUICK_GRIDS, compile_blocks=True, show_progress=False,
                                          point_target_s=0.002, min_repeats=1, max_repeats=2)
    prof = profile_from_dict(profile_models([TINY], [1, 2], settings, command="test"))
    assert prof.runs[-1]["errors"] == []
    _assert_covers(prof, TINY, [1, 2])
    for op in GRAPHED_OPS:
        assert prof.layer_time_s(TINY, "block", op, 1, 1000, 100) > 0
    assert torch.randn(4, device="cuda").isfinite().all()  # the generator survived the captures
    call = Call("actor_train", "actor", "train", ("ids",), (), 8, 128, n_minibatches=1)
    p = Placement((0,), num_micro_batches=2)
    graphed = t_call(call, p, TINY, prof, load_cluster("h100"), ModelOptions(train_graphs=True)).time_s
    eager = t_call(call, p, TINY, prof, load_cluster("h100"), ModelOptions(train_graphs=False)).time_s
    assert graphed != pytest.approx(eager)


def test_profile_feeds_the_cost_model(tiny_profile):
    prof = profile_from_dict(tiny_profile)
    cluster = load_cluster("cpu")
    calls = [Call("gen", "actor", "generate", ("prompts",), ("ids",), 8, 48, max_new_tokens=16),
             Call("inf", "ref", "inference", ("ids",), ("lp",), 8, 48),
             Call("train", "actor", "train", ("ids",), (), 8, 48, n_minibatches=2)]
    for call in calls:
        for p in (Placement((0,)), Placement((0, 1), tp=2), Placement((0, 1, 2, 3), dp=2, pp=2, num_micro_batches=2)):
            ct = t_call(call, p, TINY, prof, cluster)
            assert ct.time_s > 0, (call.name, p)
    critic = TINY.with_critic(True)
    assert t_call(calls[2], Placement((0,)), critic, prof, cluster).time_s > 0
    assert prof.fallbacks == []


def test_points_that_do_not_fit_are_skipped_and_filled():
    import dataclasses

    small_cache = dataclasses.replace(FAST, decode_cache_bytes_max=20_000)  # b=4, K=64: 66 kB of one-layer cache
    d = profile_models([TINY], [1], small_cache, command="test")
    (run,) = d["runs"]
    assert any("block tp=1 decode/decode_host/decode_capture batch=4 kv_len>=64" in s and "KV cache" in s
               for s in run["skipped"])
    for op in ("decode", "decode_host", "decode_capture"):
        assert any(s.endswith(f"block tp=1 {op} batch=4 kv_len=64") for s in run["filled"])
    _assert_covers(profile_from_dict(d), TINY, (1,))


def test_block_token_ops_are_timed_as_chains(monkeypatch):
    """With ``chain_tokens``, a block's token ops run as chains of k calls, each on the previous output."""
    import dataclasses

    from executor import profiler
    from reallm.model.transformer import DecoderLayer

    settings = dataclasses.replace(FAST, grids=Grids(tokens=(16, 64), seqlens=(16,), batches=(1,), kv_lens=(16,)),
                                   chain_tokens=64)
    assert [settings.chain_length(t) for t in (1, 16, 64, 100)] == [8, 4, 1, 1]
    assert ProfileSettings.for_device("cuda").chain_length(4096) == profiler.CHAIN_MAX
    assert ProfileSettings.for_device("cpu").chain_length(16) == 1
    calls = []  # (tokens, input id, output id) of every block call under grad (forward, forward_ckpt)
    real = DecoderLayer.forward

    def spy(self, x, ctx):
        y = real(self, x, ctx)
        if torch.is_grad_enabled() and not ctx.decode:
            calls.append((x.shape[0], id(x), id(y)))
        return y

    monkeypatch.setattr(DecoderLayer, "forward", spy)
    profile_models([TINY], [1], settings, command="test")
    chained = {T: sum(1 for a, b in zip(calls, calls[1:]) if a[0] == b[0] == T and b[1] == a[2]) for T in (16, 64)}
    assert chained[16] > 0  # k = 4 at 16 tokens: calls fed by the previous call's output
    assert chained[64] == 0  # k = 1 at 64 tokens


def test_monotone_averages_violations_and_keeps_the_skipped_tail():
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([2.0, 1.0, 1.0]) == pytest.approx([4 / 3] * 3)
    assert monotone([[1.0, 3.0, 2.0], [0.5, 5.0, None]], along_x=False) == [[1.0, 2.5, 2.5], [0.5, 5.0, None]]
    # Decode tables also along batch: column 0 pools 1.0 and 0.5.
    assert monotone([[1.0, 3.0, 2.0], [0.5, 5.0, None]], along_x=True) == [[0.75, 2.5, 2.5], [0.75, 5.0, None]]


def test_bumps_are_interpolated_over_before_the_isotonic_pass():
    # The Qwen2-0.5B head forward as measured (ms): 2048-8192 tokens slower than 16384.
    ys = [16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    raw = [1.454, 1.431, 1.382, 1.46, 1.50, 35.0, 69.8, 140.3, 11.93, 24.07]
    fixed = drop_bumps(raw, ys)
    assert fixed[:5] == raw[:5] and fixed[8:] == raw[8:]
    for j in (5, 6, 7):  # on the line from 1024 to 16384 tokens
        assert fixed[j] == pytest.approx(1.50 + (ys[j] - 1024) / (16384 - 1024) * (11.93 - 1.50))
    # the next measurement: 8192 tokens at 2.3x the per-token time of 4096, yet below 16384's time
    raw2 = [1.647, 1.51, 1.467, 1.476, 1.407, 1.927, 3.086, 14.02, 12.06, 24.67]
    fixed2 = drop_bumps(raw2, ys)
    assert fixed2[:7] == raw2[:7] and fixed2[8:] == raw2[8:]
    assert fixed2[7] == pytest.approx(3.086 + (8192 - 4096) / (16384 - 4096) * (12.06 - 3.086))
    assert drop_bumps([1.0, 1.0, 1.0, 9.0], [1, 2, 4, 8]) == [1.0, 1.0, 1.0, 9.0]  # the last point stays
    # 4.5 is below twice 5.0 but over twice what 1.0 at y=1 scales to at y=2: on the line from 1 to 4
    assert drop_bumps([1.0, 4.5, 5.0], [1, 2, 4]) == pytest.approx([1.0, 1.0 + 4.0 / 3, 5.0])
    assert drop_bumps([5.0, 1.0, 2.0], [1, 2, 4]) == [1.0, 1.0, 2.0]  # no kept point below: the next one above
    assert drop_bumps([1.0, 1.9, 1.0], [1, 2, 4]) == [1.0, 1.9, 1.0]  # within 2x: left to the isotonic pass
    smooth = monotone([raw], along_x=False, ys=ys)[0]
    assert smooth == sorted(smooth) and smooth[7] < 11.93 + 1e-9
    assert monotone([raw], along_x=False)[0][9] > 24.07  # without ys the bump leaks into the larger sizes


def test_fill_table_extrapolates_the_missing_tail():
    xs, ys = (1, 2, 4), (10, 20, 40, 80)
    vals = [[1.0, 2.0, 4.0, 8.0], [2.0, 4.0, None, None], [3.0, None, None, None]]
    out, filled = fill_table(xs, ys, vals)
    assert out[1] == [2.0, 4.0, 8.0, 16.0]  # along the row's last segment
    assert out[2][1] == pytest.approx(4.0 + (4.0 - 2.0) * 2 / 1)  # from the two rows above, along batch
    assert len(filled) == 5 and all(v is not None for r in out for v in r)
    assert fill_table((1,), (10, 20), [[None, None]])[0] is None


def test_cli_writes_merges_and_the_cost_model_reads(tmp_path):
    cfg = tmp_path / "tiny"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    out = tmp_path / "prof.json"
    common = ["--model-path", str(cfg), "--device", "cpu", "--quick", "--no-progress", "--out", str(out)]
    assert planner_main(["profile", "--tp", "1", *common]) == 0
    prof = load_profile(str(out))
    _assert_covers(prof, TINY, (1,))
    assert prof.runs[0]["command"].startswith("planner profile --tp 1 --model-path")
    assert planner_main(["profile", "--tp", "2", "--merge", *common]) == 0
    prof = load_profile(str(out))
    _assert_covers(prof, TINY, (1, 2))
    assert [r["tp"] for r in prof.runs] == [[1], [2]]
    # Merging into a version-1 file (timed differently) is refused with a clear error.
    old = json.loads(out.read_text())
    old["version"] = 1
    out.write_text(json.dumps(old))
    with pytest.raises(SystemExit) as e:
        planner_main(["profile", "--tp", "4", "--merge", *common])
    assert e.value.code == 2


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        planner_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_bad_input_is_a_clean_error(capsys, tmp_path):
    out = str(tmp_path / "p.json")
    _fails(capsys, ["profile", "--model", "gpt-7b", "--out", out], "no such preset", "llama-7b")
    _fails(capsys, ["profile", "--model", "seven", "--out", out], "expected a preset name")
    _fails(capsys, ["profile", "--out", out], "name at least one model")
    _fails(capsys, ["profile", "--model", "llama-7b", "--tp", "3", "--out", out], "tp=3", "divide")
    _fails(capsys, ["profile", "--model", "llama-7b", "--tp", "two", "--out", out], "--tp two")
    _fails(capsys, ["profile", "--model", "llama-7b", "--out", str(tmp_path / "no" / "p.json")], "does not exist")
    _fails(capsys, ["profile", "--model", "llama-7b", "--device", "cpu", "--tokens", "8,4", "--out", out],
           "strictly increasing")
    analytic = tmp_path / "analytic.json"
    analytic.write_text((PROFILE_DIR / "h100_analytic.json").read_text())
    _fails(capsys, ["profile", "--model", "llama-1.1b", "--device", "cpu", "--merge", "--out", str(analytic)],
           "--merge adds to a measured profile")


def test_loader_accepts_both_and_checks_the_new_fields(tiny_profile):
    assert load_profile(str(PROFILE_DIR / "h100_analytic.json")).runs == []  # no runs, no assumed: still loads
    d = json.loads(json.dumps(tiny_profile))
    d["collectives"]["nvlink"]["2"]["assumed"] = "yes"
    d["collectives"]["ib"]["2"]["extra"] = 1
    d["runs"][0].pop("command")
    with pytest.raises(UserError) as e:
        profile_from_dict(d)
    msg = str(e.value)
    assert "assumed must be true or false" in msg and "unknown field(s) ['extra']" in msg and "command" in msg


def test_default_profile_prefers_a_measured_file_of_the_device(tiny_profile, tmp_path, monkeypatch):
    from planner.cost_model.analytic_profile import compact_json

    monkeypatch.setattr(profile_mod, "PROFILE_DIR", tmp_path)
    cpu = load_cluster("cpu")
    (tmp_path / "cpu_measured.json").write_text(compact_json(tiny_profile))
    assert default_profile(cpu).source == "measured"
    other = dict(tiny_profile, device="NVIDIA H200")
    (tmp_path / "h100_measured.json").write_text(compact_json(other))
    with pytest.warns(UserWarning, match="not this cluster's"):
        assert default_profile(load_cluster("h100")).source == "analytic"


def _collectives_on(rank, world):
    return measure_collectives("cpu", small_bytes=256, big_bytes=1 << 16, repeats=1)


def test_collectives_are_measured_with_several_processes():
    measured, other = run_workers(2, _collectives_on)
    assert other is None
    ops = measured["nvlink"][2]
    assert set(ops) == {"all_reduce", "all_gather", "reduce_scatter", "p2p"}
    table = collectives_table(AnalyticRates.h100(), measured, None)
    assert "assumed" not in table["nvlink"]["2"] and table["nvlink"]["4"]["assumed"] is True
    assert table["nvlink"]["2"]["bandwidth_bytes_per_s"] == ops["all_reduce"]["bandwidth_bytes_per_s"]


def test_grids_validate():
    with pytest.raises(UserError, match="kv_lens"):
        Grids(tokens=(1,), seqlens=(1,), batches=(1,), kv_lens=())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_a_failed_capture_leaves_the_generator_usable_after_reset():
    """A capture that breaks part-way (here: a synchronising call inside it) leaves the default CUDA
    generator's state marked as capturing; ``reset_cuda_generator`` makes it draw again."""
    from executor.profiler import reset_cuda_generator

    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(Exception):  # noqa: B017, PT011 - which error CUDA reports differs by version
        with torch.cuda.graph(g):
            torch.randn(4, device="cuda")
            torch.cuda.synchronize()
    reset_cuda_generator()
    assert torch.randn(4, device="cuda").isfinite().all()
    assert torch.rand(1000, device="cuda").std() > 0.2


def test_stream_step_points_split_into_a_blocks_share_and_the_rest():
    """The stream step is one launch over the whole model, so the profiler times it on 1- and 3-block models:
    a block's share is half the difference and the rest what the 1-block step has beyond one block (noise
    that would make a share negative is clamped)."""
    from executor.profiler import split_stream_point

    one, three = (1.0e-3, 4e-5, 9e-3), (1.2e-3, 5e-5, 1.3e-2)  # (device, host, one-off) seconds
    per, per_capture, outside, host, outside_capture = split_stream_point(one, three)
    assert per == pytest.approx(1e-4) and per_capture == pytest.approx(2e-3)
    assert outside == pytest.approx(9e-4) and outside_capture == pytest.approx(7e-3) and host == 4e-5
    # a model of L blocks then costs outside + L * per: the 3-block step is reproduced
    assert outside + 3 * per == pytest.approx(three[0]) and outside_capture + 3 * per_capture == pytest.approx(three[2])
    assert split_stream_point(one, (0.9e-3, 4e-5, 8e-3))[:2] == (0.0, 0.0)
