"""Model-core throughput on one CPU thread: training (forward+backward), prefill and decode tokens/s.

    python bench/bench_model_cpu.py [--threads 1] [--repeat 3] [--device cpu] [--dtype float32] [--cuda-graph]

A tiny-ish LLaMA (GQA) with random weights; packed batches of sequences of mixed lengths. Rows:
``train fwd+bwd`` = SFT loss forward + backward (no optimizer), with and without gradient checkpointing;
``prefill`` = no-grad packed forward; ``decode`` = greedy generation tokens/s after the prefill
(static KV cache, B sequences per step). Reported: best of ``--repeat`` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from reallm.model import GenerationConfig, Transformer, sft_loss, sft_micro_batch
from reallm.model.generate import generate
from reallm.spec import ModelSpec


def bench_spec() -> ModelSpec:
    return ModelSpec("llama", num_layers=4, hidden_size=256, intermediate_size=688, num_heads=8, num_kv_heads=4,
                     head_dim=32, vocab_size=4096, source="bench tiny-ish llama")


def best_of(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seqs", type=int, default=8, help="sequences per batch")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cuda-graph", action="store_true", help="replay decode steps from a CUDA graph")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    spec = bench_spec()
    model = Transformer(spec, device=args.device, dtype=dtype)
    model.init_weights(seed=0, std=0.05)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 192, (args.seqs,), generator=g).tolist()
    seqs = [torch.randint(4, spec.vocab_size, (n,), generator=g).tolist() for n in lengths]
    mb = sft_micro_batch(seqs, [n // 4 for n in lengths], device=args.device)
    num_tokens = sum(lengths)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        sft_loss(model(mb["tokens"], mb["cu_seqlens"]), mb)[0].backward()

    def train_ckpt() -> None:
        model.gradient_checkpointing = True
        try:
            train()
        finally:
            model.gradient_checkpointing = False

    @torch.no_grad()
    def prefill() -> None:
        model(mb["tokens"], mb["cu_seqlens"])

    prompts = [s[:32] for s in seqs]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, greedy=True)

    def gen_prefill_only() -> None:
        generate(model, prompts, GenerationConfig(max_new_tokens=1, greedy=True), eos_token_id=None, pad_token_id=0)

    def gen() -> None:
        generate(model, prompts, cfg, eos_token_id=None, pad_token_id=0, use_cuda_graph=args.cuda_graph)

    rows = []
    model.train()
    t = best_of(train, args.repeat)
    rows.append(("train fwd+bwd", num_tokens, t))
    t = best_of(train_ckpt, args.repeat)
    rows.append(("train fwd+bwd (grad ckpt)", num_tokens, t))
    model.eval()
    t = best_of(prefill, args.repeat)
    rows.append(("prefill (no grad)", num_tokens, t))
    t_pre = best_of(gen_prefill_only, args.repeat)
    t_gen = best_of(gen, args.repeat)
    # Decode alone: the generate call minus its one-token version (prefill + first sample).
    decode_tokens = args.seqs * (args.new_tokens - 1)
    graph = ", cuda graph" if args.cuda_graph else ""
    rows.append((f"decode (B={args.seqs}, {args.new_tokens} new{graph})", decode_tokens, t_gen - t_pre))

    print(f"{spec.source}: {spec.num_params / 1e6:.1f}M params, L={spec.num_layers} h={spec.hidden_size} "
          f"heads={spec.num_heads}/{spec.num_kv_heads} V={spec.vocab_size}; device={args.device} dtype={args.dtype} "
          f"threads={args.threads}; torch {torch.__version__}")
    print(f"{'what':34s} {'tokens':>8s} {'time_s':>9s} {'tokens/s':>10s}")
    for name, n, t in rows:
        print(f"{name:34s} {n:8d} {t:9.4f} {n / t:10.0f}")


if __name__ == "__main__":
    main()
