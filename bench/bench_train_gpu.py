"""Training throughput and MFU of a LLaMA-shaped 1.1B model on one GPU (issue 12, target 1).

    python bench/bench_train_gpu.py [--variants ours,ours-compiled,hf] [--steps 10] [--out result.json]

The model (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, vocab 32000, bf16, random
weights) trains on 8 packed sequences of 2048 tokens per step: forward, backward and AdamW.

  ours            the executor's path: ``ParallelModel`` (flat bf16 parameters, fp32 gradient buffer and
                  master weights, ``FlatAdamW``), varlen flash attention, next-token loss on every token
  ours-compiled   the same with the blocks as torch.compile'd regions (``Transformer.compile``)
  hf              plain ``transformers`` LlamaForCausalLM (SDPA) + ``torch.optim.AdamW(fused=True)``,
                  batch [8, 2048]: the reference point of the issue

MFU counts 6 · matmul parameters · tokens + causal attention 6 · s · (heads · head_dim) · layers per
token (forward + backward) against the vendor's dense bf16 peak (989 TFLOP/s). Warm-up steps (compile,
autotuning, allocator growth) are excluded; the figure is the median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from reallm.spec import ModelSpec

PEAK_FLOPS = 989e12
PROFILE = False
SPEC_1B = ModelSpec(family="llama", num_layers=22, hidden_size=2048, intermediate_size=5632, num_heads=32,
                    num_kv_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                    source="1.1B benchmark shape")


def matmul_params(spec: ModelSpec) -> int:
    h, q, kv, i = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    return spec.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * spec.vocab_size


def flops_per_step(spec: ModelSpec, batch: int, seqlen: int) -> float:
    tokens = batch * seqlen
    attn = 6 * seqlen * spec.num_heads * spec.head_dim * spec.num_layers * tokens
    return 6 * matmul_params(spec) * tokens + attn


def _timed_steps(step, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_ours(spec: ModelSpec, batch: int, seqlen: int, steps: int, warmup: int, compiled: bool,
             checkpointing: bool) -> dict:
    from executor.comm import Group
    from reallm.model.optim import OptimizerSettings
    from reallm.model.train import sft_micro_batch
    from reallm.parallel import ParallelModel, sft_loss
    from reallm.parallel.groups import ParallelGroups
    from reallm.placement import Placement

    groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))
    pm = ParallelModel.build(None, groups, spec=spec, dtype=torch.bfloat16, device="cuda",
                             optimizer=OptimizerSettings(lr=1e-5), total_steps=10_000, init_seed=1,
                             compile_blocks=compiled, gradient_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, spec.vocab_size, (batch, seqlen), generator=g).tolist()
    mb = sft_micro_batch(seqs, [1] * batch, device="cuda")
    losses = []

    def step():
        losses.append(pm.train_step([mb], sft_loss)["loss"])

    times = _timed_steps(step, steps, warmup)
    if PROFILE:
        from bench.profiling import kernel_table

        print(kernel_table(step, rows=30, op_rows=30), flush=True)
    return {"times_s": times, "loss_first": losses[0], "loss_last": losses[-1],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def attention_table(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int) -> str:
    """Forward + backward of one layer's causal attention, per implementation (CUDA events, median of 10)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from reallm.model.attention import PackedSeqs, batched_attention, varlen_attention

    T = batch * seqlen
    cu = torch.arange(0, T + 1, seqlen, dtype=torch.int32, device="cuda")
    seqs = PackedSeqs.from_cu_seqlens(cu)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k = torch.randn(T, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    v = torch.randn(T, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    scale = head_dim ** -0.5

    def sdpa_gqa(backend):
        def f():
            qb, kb, vb = (t.view(batch, seqlen, -1, head_dim).transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                                                     enable_gqa=True)
            return o.transpose(1, 2).reshape(T, heads, head_dim)
        return f

    impls = {"varlen (flash 2)": lambda: varlen_attention(q, k, v, seqs, scale),
             "batched (cuDNN, kv repeated)": lambda: batched_attention(q, k, v, seqs, scale),
             "sdpa cuDNN enable_gqa": sdpa_gqa(SDPBackend.CUDNN_ATTENTION),
             "sdpa flash enable_gqa": sdpa_gqa(SDPBackend.FLASH_ATTENTION)}
    lines = ["attention fwd+bwd, one layer:"]
    for name, f in impls.items():
        try:
            def once(f=f):
                o = f()
                o.sum().backward()
            for _ in range(3):
                once()
            ts = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                once()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            lines.append(f"  {statistics.median(ts):7.3f} ms  {name}")
        except Exception as e:  # an implementation this torch lacks
            lines.append(f"  unavailable  {name}: {type(e).__name__}: {str(e)[:80]}")
    return "\n".join(lines)


def run_hf(spec: ModelSpec, batch: int, seqlen: int, steps: int, warmup: int) -> dict:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                   intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                                   num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                                   max_position_embeddings=4096, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seqlen), generator=g).cuda()
    losses = []

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))

    times = _timed_steps(step, steps, warmup)
    return {"times_s": times, "loss_first": losses[0], "loss_last": losses[-1],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "transformers": transformers.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="ours,ours-compiled,hf")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print a kernel-time table of one step per variant")
    args = ap.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    if args.profile:
        s = SPEC_1B
        print(attention_table(args.batch, args.seqlen, s.num_heads, s.num_kv_heads, s.head_dim), flush=True)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    spec = SPEC_1B
    flops = flops_per_step(spec, args.batch, args.seqlen)
    tokens = args.batch * args.seqlen
    rows = []
    for v in args.variants.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if v == "hf":
            r = run_hf(spec, args.batch, args.seqlen, args.steps, args.warmup)
        else:
            r = run_ours(spec, args.batch, args.seqlen, args.steps, args.warmup, v.endswith("compiled"),
                         args.checkpointing)
        med = statistics.median(r["times_s"])
        r.update(variant=v, step_s=med, tokens_per_s=tokens / med, mfu=flops / med / PEAK_FLOPS)
        rows.append(r)
        print(f"{v}: {med * 1e3:.1f} ms/step, {tokens / med:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, "
              f"peak {r['peak_gib']:.1f} GiB, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)
    print(f"\n| variant | step ms | tokens/s | MFU | peak GiB |  ({torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}, batch {args.batch}x{args.seqlen}, {flops / 1e12:.1f} TFLOP/step)")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_gib']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
