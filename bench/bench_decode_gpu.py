"""Decode step time of the 1.1B model against the memory floor (issue 12, target 2).

    python bench/bench_decode_gpu.py [--variants ...] [--batch 64 --prompt 128 --new 256] [--out r.json]

Batch 64, prompt 128, 256 new tokens, greedy, no early stop. Steady state (executor variants): (generation of
``new`` − generation of ``new``/2 tokens) / (``new``/2), which leaves out the per-call costs (prefill,
capture), against the floor of those later steps. A decode step's memory floor is the bytes
it must read — every weight but the embedding table (it reads 64 rows of it) plus the keys and values
cached so far — over the measured device-copy bandwidth (read + write bytes of a large
``copy_``, measured here). The floor of the run is the mean over its steps; the step time is
(generation − prefill) / (new tokens − 1).

Variants (all capture the decode step in a CUDA graph):
  sdpa            masked SDPA over the whole static cache, eager blocks
  kernel          the Triton append-and-attend kernel (``reallm.kernels.decode_attention``), eager blocks
  kernel-compiled the kernel, blocks as torch.compile'd regions (``Transformer.compile``)
  executor        ``ParallelModel.generate`` (the executor's ring, one rank) with compiled blocks
  executor-kept   the same with the KV cache and captured decode step kept between calls
                  (``ParallelModel.keep_decode_graphs``: a generation call with its devices to itself)
  executor-fused  the same with each block of a decode step as 5 fused Triton kernels
                  (``Transformer.use_fused_decode``; slower than ``executor`` so far, BENCHMARKS.md)
  stream          ``generate`` with the one-launch stream step (``reallm.model.stream_decode``)
  The executor variants use the stream step where it runs (sm_90) unless named ``…-library``
  (e.g. ``executor-kept-library``); the others run the library step unless named ``stream``.
  hf              ``transformers`` ``generate`` (static cache off: defaults), for reference
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.bench_train_gpu import SPEC_1B
from reallm.model.generate import GenerationConfig, generate
from reallm.model.transformer import Transformer


def copy_bandwidth() -> float:
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() * 2 / statistics.median(ts)


def floor_s(spec, batch: int, prompt: int, new: int, bw: float, first: int = 1) -> float:
    weights = 0
    h, V = spec.hidden_size, spec.vocab_size
    per_layer = (h * spec.num_heads * spec.head_dim * 2 + 2 * h * spec.num_kv_heads * spec.head_dim
                 + 3 * h * spec.intermediate_size + 2 * h)
    weights = 2 * (spec.num_layers * per_layer + h * V + h)
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    steps = range(first, new)  # decode steps read a cache of prompt + t tokens, t = first .. new - 1
    return statistics.mean((weights + batch * (prompt + t) * kv_per_token) / bw for t in steps)


def time_generate(run, reps: int) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="sdpa,kernel,kernel-compiled,executor,hf")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="graph-replay time and a kernel table per variant")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    spec = SPEC_1B
    bw = copy_bandwidth()
    floor = floor_s(spec, args.batch, args.prompt, args.new, bw)
    floor_late = floor_s(spec, args.batch, args.prompt, args.new, bw, first=args.new // 2)  # steady-state steps
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, spec.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    cfg_full = GenerationConfig(max_new_tokens=args.new, greedy=True)
    cfg_one = GenerationConfig(max_new_tokens=1, greedy=True)
    model = Transformer(spec, device="cuda", dtype=torch.bfloat16)
    model.init_weights(1)
    model.eval()
    rows, ref_tokens = [], None
    for v in args.variants.split(","):
        torch.cuda.empty_cache()
        if v == "hf":
            step = run_hf(spec, prompts, args)
        else:
            if v.startswith("executor"):
                # executor-autotune: Inductor's GEMM autotuning for the inference regions
                os.environ["REALLM_INFERENCE_AUTOTUNE"] = "1" if v == "executor-autotune" else "0"
                run = executor_runner(spec, prompts, args)
                run_one = executor_runner(spec, prompts, args, new=1)
                run_half = executor_runner(spec, prompts, args, new=args.new // 2)
                _PM.model.use_fused_decode = v == "executor-fused"
                _PM.model.use_stream_decode = not v.endswith("-library")
                _PM.keep_decode_graphs(v.startswith("executor-kept"))
            else:
                model.use_stream_decode = v == "stream"
                model.use_decode_kernel = v.startswith("kernel")
                model.compile(v.endswith("compiled"))

                def run(cfg=cfg_full):
                    return generate(model, prompts, cfg, eos_token_id=None, pad_token_id=0, use_cuda_graph=True)

                def run_one(run=run):
                    return run(cfg_one)

            with torch.no_grad():
                out = run()  # warm-up: compile, autotune, capture
                toks = out.tokens_BN if out is not None else None
                total = time_generate(run, args.reps)
                prefill = time_generate(run_one, args.reps)
                steady = None
                if v.startswith("executor"):
                    run_half()  # (kept variant: its own cache capacity, captured once here)
                    steady = (total - time_generate(run_half, args.reps)) / (args.new - args.new // 2)
            step = (total - prefill) / (args.new - 1)
            if args.profile:
                print(replay_breakdown(_PM.model if v.startswith("executor") else model, prompts, args), flush=True)
            if toks is not None:
                agree = None if ref_tokens is None else float((toks == ref_tokens).float().mean())
                ref_tokens = toks if ref_tokens is None else ref_tokens
                print(f"  {v}: token agreement with the first variant {agree}", flush=True)
        rows.append({"variant": v, "step_s": step, "x_floor": step / floor, "steady_s": steady})
        ss = f"; steady state {steady * 1e3:.3f} ms = {steady / floor_late:.2f}x its floor" if steady else ""
        print(f"{v}: decode step {step * 1e3:.3f} ms = {step / floor:.2f}x the floor{ss}", flush=True)
    print(f"\n| variant | decode step ms | x memory floor | steady-state step ms | x floor |  "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__},"
          f" batch {args.batch}, prompt {args.prompt}, {args.new} new; copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"floor {floor * 1e3:.3f} ms, of the steady-state steps {floor_late * 1e3:.3f} ms)")
    print("|---|---|---|---|---|")
    for r in rows:
        st = f"{r['steady_s'] * 1e3:.3f} | {r['steady_s'] / floor_late:.2f}" if r["steady_s"] else "– | –"
        print(f"| {r['variant']} | {r['step_s'] * 1e3:.3f} | {r['x_floor']:.2f} | {st} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bw, "floor_s": floor,
                       "floor_late_s": floor_late, "rows": rows}, f,
                      indent=1)
    return 0


@torch.no_grad()
def replay_breakdown(model, prompts, args) -> str:
    """The captured decode step alone (replayed back to back), and the kernels of 8 uncaptured steps."""
    from bench.profiling import kernel_table
    from reallm.model.generate import DecodeRunner
    from reallm.model.transformer import pack_sequences

    B = len(prompts)
    cache = model.new_kv_cache(B, args.prompt + args.new)
    tokens, cu = pack_sequences(prompts, device="cuda")
    model(tokens, cu, kv_cache=cache, select_rows=(cu[1:] - 1).long())
    tok = torch.zeros(B, dtype=torch.int64, device="cuda")
    pos = torch.full((B,), args.prompt + args.new // 2, dtype=torch.int64, device="cuda")
    runner = DecodeRunner(model, cache, True)
    for _ in range(3):
        runner(tok, pos)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(50):
        runner.graph.replay()
    b.record()
    b.synchronize()
    replay_ms = a.elapsed_time(b) / 50

    def eager_steps():
        for _ in range(8):
            model.decode(tok, pos, cache)

    return f"  graph replay {replay_ms:.3f} ms/step (kv {args.prompt + args.new // 2})\n" + kernel_table(eager_steps)


def executor_runner(spec, prompts, args, new=None):
    from executor.comm import Group
    from reallm.parallel import ParallelModel
    from reallm.parallel.groups import ParallelGroups
    from reallm.placement import Placement

    global _PM
    if "_PM" not in globals():
        groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))
        _PM = ParallelModel.build(None, groups, spec=spec, dtype=torch.bfloat16, device="cuda", init_seed=1,
                                  compile_blocks=True)
    cfg = GenerationConfig(max_new_tokens=new or args.new, greedy=True)
    return lambda: _PM.generate(prompts, cfg, eos_token_id=None, pad_token_id=0)


def run_hf(spec, prompts, args) -> float:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                   intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                                   num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                                   max_position_embeddings=4096)
    m = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.tensor(prompts, device="cuda")
    new = min(args.new, 64)  # HF is slow; 64 steps are enough for a per-step figure

    def run(n):
        return lambda: m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.no_grad():
        run(2)()
        total = time_generate(run(new), 1)
        prefill = time_generate(run(1), 1)
    return (total - prefill) / (new - 1)


if __name__ == "__main__":
    sys.exit(main())
