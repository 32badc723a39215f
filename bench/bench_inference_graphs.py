"""Inference forward of the 1.1B model, eager vs replayed from CUDA graphs (``reallm.model.graphs``).

    python bench/bench_inference_graphs.py [--model llama-1.1b] [--repeats 7]

``ParallelModel.logprobs`` (a reference model's call) with compiled blocks, bf16, on micro-batch settings of
equal and ragged lengths (ragged: each length uniform in [s/2, s]); per setting the median / min / max wall
time over the repeats after two warm-up calls (the second captures), the speed-up, and the largest difference of
any log-prob between the two paths (ragged packs run the same attention kernel in both, equal-length packs
too: expect 0 unless the padding changes a GEMM's blocking). CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (sequences, tokens per sequence, micro-batches, ragged)
SETTINGS = [(8, 128, 1, False), (16, 300, 1, True), (64, 200, 4, True), (20, 448, 2, False),
            (48, 384, 3, False), (12, 768, 1, False), (6, 1536, 1, False), (32, 1024, 2, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1.1b")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    import torch

    from planner.cli import preset_by_name
    from reallm.model.transformer import pack_sequences
    from reallm.parallel import GroupCache, ParallelModel
    from reallm.placement import Placement

    if not torch.cuda.is_available():
        print("CUDA only", file=sys.stderr)
        return 2
    spec = preset_by_name(args.model)
    dev = torch.device("cuda", torch.cuda.current_device())
    pm = ParallelModel.build(None, GroupCache().groups_for(Placement((0,)), 0), spec=spec, dtype=torch.bfloat16,
                             device=dev, init_seed=0, compile_blocks=True, inference_graphs=False)
    rows = []
    for n, s, m, ragged in SETTINGS:
        g = torch.Generator().manual_seed(n * 7 + s)
        lens = [int(torch.randint(s // 2, s + 1, (1,), generator=g)) if ragged else s for _ in range(n)]
        seqs = [torch.randint(1, spec.vocab_size, (L,), generator=g).tolist() for L in lens]
        b = n // m
        mbs = []
        for a in range(0, n, b):
            t, cu = pack_sequences(seqs[a:a + b], device=dev)
            mbs.append({"tokens": t, "cu_seqlens": cu})
        res = {}
        for mode in ("eager", "graphed"):
            pm.graphs = None
            if mode == "graphed":
                pm.use_inference_graphs()
            for _ in range(2):  # a bucket is captured the second time it is met
                pm.logprobs(mbs)
            ts = []
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = pm.logprobs(mbs)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            res[mode] = (statistics.median(ts), min(ts), max(ts), torch.cat(out).float())
        diff = (res["eager"][3] - res["graphed"][3]).abs().max().item()
        label = f"n={n} s={s} m={m}{' ragged' if ragged else ''}"
        rows.append((label, sum(lens) // m, res["eager"][:3], res["graphed"][:3], diff))
        print(label, f"eager {res['eager'][0] * 1e3:.2f} ms, graphed {res['graphed'][0] * 1e3:.2f} ms", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, {args.repeats} repeats\n")
    print("| setting | tokens / micro-batch | eager ms (min–max) | graphed ms (min–max) | speed-up | max |Δ log-prob| |")
    print("|---|---|---|---|---|---|")
    for label, tok, e, gr, diff in rows:
        print(f"| {label} | {tok} | {e[0] * 1e3:.1f} ({e[1] * 1e3:.1f}–{e[2] * 1e3:.1f}) | "
              f"{gr[0] * 1e3:.1f} ({gr[1] * 1e3:.1f}–{gr[2] * 1e3:.1f}) | {e[0] / gr[0]:.2f}× | {diff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
