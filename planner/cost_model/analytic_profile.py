"""Analytic profiles: layer times from datasheet rates (a roofline), in the measured profiles' schema.

Run ``python -m planner.cost_model.analytic_profile [--out profiles/h100_analytic.json]`` to write the
shipped H100 profile for every preset model shape (``reallm.spec.PRESETS``), tp ∈ {1, 2, 4, 8}. It is
marked ``"source": "analytic"``: an estimate from rates, not a measurement.

Rates (``AnalyticRates.h100``): peak bf16 dense P = 989 TFLOP/s used at efficiency η_mm = 0.6 for the
matmuls (≈ 593 TFLOP/s; a large matmul measures ≈ 790) and η_attn = 0.45 for flash attention; HBM
B = 3.35 TB/s at η_mem = 0.85 (≈ 2.85 TB/s; a device copy measures ≈ 3.0); a kernel launch costs
4 µs (2 µs in decode, which runs under CUDA graphs). NVLink 450 GB/s and InfiniBand 50 GB/s per
device, used at 80% as ring bus bandwidth; collective latency α·(1 + log2 n) with α = 5 µs (NVLink),
10 µs (IB). Host copies 55 GB/s (pinned, measured).

Per tp rank, with T tokens per micro-batch in sequences of length s, tp degree t, bf16 (2 bytes):

  block weights per rank    W = h·(q/t + 2·kv_r) + (q/t)·h + 3·h·(I/t)
                            (kv_r = kv/t, or one head's width when t > kv heads: replicated)
  forward_s   = max(2·T·W / (η_mm·P), 2·W / (η_mem·B))               matmuls (roofline)
              + 2·T·(s+1)·(q/t) / (η_attn·P)                          causal attention, QK and PV
              + 2·T·(12·h + 2·(q/t + kv_r) + 3·I/t) / (η_mem·B)       norms, rope, residual, SwiGLU
              + 12 kernels · 4 µs
  backward_s  = 2× the matmul and elementwise terms, 2.5× attention, 2× the kernels (no recompute)
  prefill_s   = forward_s + 4·T·kv_r / (η_mem·B)                      KV-cache write
  decode_s(b, K) = max((2·b·W + 4·b·K·q/t) / (η_mm·P), (2·W + 4·b·K·kv_r) / (η_mem·B)) + 12 · 2 µs
  decode_host_s = 0 at tp = 1 (generation replays the step as one CUDA graph), else 30 ops · H
  decode_capture_s = 2 · 30 ops · H at tp = 1 (eager warm-up step + capture), else 0
  head (LM):  W = ceil(V/t)·h; forward = roofline matmul + T·(V/t)·10 bytes of log-softmax traffic;
              prefill only computes the logits of each sequence's last token (T/s rows); decode is the
              matmul of b rows (+ 8 kernels), host and capture as a block with 6 ops.
  decode step (per step, outside the layers; V' = the vocabulary padded for tp):
              launch = 4 kernels · 2 µs, launch_host = 2 ops · H (tp = 1: input copies + graph launch) or
              6 ops · H, capture = 2 · launch_host;
              greedy = b·V'·12 bytes / (η_mem·B) + 8 kernels · 2 µs, greedy_host = 8 ops · H;
              sample = b·V'·48 bytes / (η_mem·B) (softmax, top-k, top-p sort, cumsum, mask) + 50 kernels ·
              2 µs, sample_host = 50 ops · H; sample_plain (temperature only: softmax, draw) = b·V'·24 bytes
              / (η_mem·B) + 25 kernels · 2 µs, sample_plain_host = 25 ops · H; H = 25 µs per eagerly
              launched op (Python dispatch + launch).
  embedding:  a row gather (4·T·h bytes), backward a scatter-add (12·T·h bytes).
  score head: h → 1, elementwise-bound.
  optimizer:  Adam over fp32 master + 2 moments, bf16 grads and weights: 28 bytes / (η_mem·B) per parameter.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

from reallm.spec import PRESETS, ModelSpec

DTYPE_BYTES = 2
TP_DEGREES = (1, 2, 4, 8)
TOKENS_GRID = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
SEQLEN_GRID = (128, 1024, 8192)
BATCH_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
KV_GRID = (1, 128, 512, 2048, 8192, 32768)
BLOCK_KERNELS = 12
#: Eagerly launched ops of one decode step's parts (host side, module docstring).
EAGER_BLOCK_OPS, EAGER_HEAD_OPS = 30, 6
GREEDY_OPS, SAMPLE_OPS, PLAIN_SAMPLE_OPS = 8, 50, 25
ADAM_BYTES_PER_PARAM = 28


@dataclass(frozen=True)
class AnalyticRates:
    name: str
    peak_flops: float
    matmul_efficiency: float
    attention_efficiency: float
    mem_bandwidth_bytes_per_s: float
    mem_efficiency: float
    kernel_overhead_s: float
    decode_kernel_overhead_s: float
    nvlink_bandwidth_bytes_per_s: float
    nvlink_latency_s: float
    ib_bandwidth_bytes_per_s: float
    ib_latency_s: float
    host_bandwidth_bytes_per_s: float
    host_latency_s: float
    link_efficiency: float = 0.8
    #: Host time per eagerly launched op (Python dispatch + kernel launch): decode steps' host side.
    host_op_s: float = 25e-6

    @staticmethod
    def h100() -> AnalyticRates:
        return AnalyticRates("H100 SXM datasheet", peak_flops=989e12, matmul_efficiency=0.6,
                             attention_efficiency=0.45, mem_bandwidth_bytes_per_s=3.35e12, mem_efficiency=0.85,
                             kernel_overhead_s=4e-6, decode_kernel_overhead_s=2e-6,
                             nvlink_bandwidth_bytes_per_s=450e9, nvlink_latency_s=5e-6,
                             ib_bandwidth_bytes_per_s=50e9, ib_latency_s=10e-6,
                             host_bandwidth_bytes_per_s=55e9, host_latency_s=10e-6)

    @staticmethod
    def from_cluster(cluster) -> AnalyticRates:
        gpu = cluster.device_kind == "gpu"
        f = float  # the cluster YAMLs write 989.0e12, which PyYAML reads as a string
        return AnalyticRates(f"{cluster.gpu_name} cluster spec", peak_flops=f(cluster.peak_bf16_flops),
                             matmul_efficiency=0.6 if gpu else 0.5, attention_efficiency=0.45 if gpu else 0.3,
                             mem_bandwidth_bytes_per_s=f(cluster.mem_bandwidth_bytes_per_s), mem_efficiency=0.85,
                             kernel_overhead_s=4e-6 if gpu else 2e-5, decode_kernel_overhead_s=2e-6 if gpu else 2e-5,
                             nvlink_bandwidth_bytes_per_s=f(cluster.intra_node_bandwidth_bytes_per_s),
                             nvlink_latency_s=f(cluster.intra_node_latency_s),
                             ib_bandwidth_bytes_per_s=f(cluster.inter_node_bandwidth_bytes_per_s),
                             ib_latency_s=f(cluster.inter_node_latency_s),
                             host_bandwidth_bytes_per_s=f(cluster.host_device_bandwidth_bytes_per_s),
                             host_latency_s=f(cluster.intra_node_latency_s),
                             # On a CPU the host does the work: decode times are all in the device tables.
                             host_op_s=25e-6 if gpu else 0.0)

    @staticmethod
    def from_dict(d: dict) -> AnalyticRates:
        return AnalyticRates(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# -- per-rank shapes -------------------------------------------------------------------------------
def kv_width_per_rank(spec: ModelSpec, tp: int) -> int:
    """Width of k (or v) on one tp rank: split when kv heads divide by tp, else one replicated head."""
    return spec.kv_size // tp if spec.num_kv_heads % tp == 0 else spec.head_dim


def block_weights_per_rank(spec: ModelSpec, tp: int) -> int:
    """Matmul weight elements of one block on one tp rank (W in the module docstring)."""
    h, q, i = spec.hidden_size, spec.q_size // tp, spec.intermediate_size // tp
    return h * (q + 2 * kv_width_per_rank(spec, tp)) + q * h + 3 * h * i


def vocab_rows_per_rank(spec: ModelSpec, tp: int) -> int:
    return -(-spec.vocab_size // tp)


# -- roofline terms --------------------------------------------------------------------------------
def matmul_time_s(flops: float, weight_bytes: float, r: AnalyticRates) -> float:
    return max(flops / (r.matmul_efficiency * r.peak_flops), weight_bytes / (r.mem_efficiency * r.mem_bandwidth_bytes_per_s))


def attention_time_s(flops: float, r: AnalyticRates) -> float:
    return flops / (r.attention_efficiency * r.peak_flops)


def memory_time_s(num_bytes: float, r: AnalyticRates) -> float:
    return num_bytes / (r.mem_efficiency * r.mem_bandwidth_bytes_per_s)


def block_forward_s(spec: ModelSpec, tp: int, tokens: float, seqlen: float, r: AnalyticRates) -> float:
    h, q, i, kv = spec.hidden_size, spec.q_size / tp, spec.intermediate_size / tp, kv_width_per_rank(spec, tp)
    w = block_weights_per_rank(spec, tp)
    return (matmul_time_s(2 * tokens * w, DTYPE_BYTES * w, r)
            + attention_time_s(2 * tokens * (seqlen + 1) * q, r)
            + memory_time_s(DTYPE_BYTES * tokens * (12 * h + 2 * (q + kv) + 3 * i), r)
            + BLOCK_KERNELS * r.kernel_overhead_s)


def block_backward_s(spec: ModelSpec, tp: int, tokens: float, seqlen: float, r: AnalyticRates) -> float:
    h, q, i, kv = spec.hidden_size, spec.q_size / tp, spec.intermediate_size / tp, kv_width_per_rank(spec, tp)
    w = block_weights_per_rank(spec, tp)
    return (matmul_time_s(4 * tokens * w, 2 * DTYPE_BYTES * w, r)
            + 2.5 * attention_time_s(2 * tokens * (seqlen + 1) * q, r)
            + 2 * memory_time_s(DTYPE_BYTES * tokens * (12 * h + 2 * (q + kv) + 3 * i), r)
            + 2 * BLOCK_KERNELS * r.kernel_overhead_s)


def block_prefill_s(spec: ModelSpec, tp: int, tokens: float, seqlen: float, r: AnalyticRates) -> float:
    return block_forward_s(spec, tp, tokens, seqlen, r) + memory_time_s(2 * DTYPE_BYTES * tokens * kv_width_per_rank(spec, tp), r)


def block_decode_s(spec: ModelSpec, tp: int, batch: float, kv_len: float, r: AnalyticRates) -> float:
    q, kv = spec.q_size / tp, kv_width_per_rank(spec, tp)
    w = block_weights_per_rank(spec, tp)
    flops = 2 * batch * w + 4 * batch * kv_len * q
    num_bytes = DTYPE_BYTES * w + 2 * DTYPE_BYTES * batch * kv_len * kv
    return (max(flops / (r.matmul_efficiency * r.peak_flops), memory_time_s(num_bytes, r))
            + BLOCK_KERNELS * r.decode_kernel_overhead_s)


def head_forward_s(spec: ModelSpec, tp: int, tokens: float, r: AnalyticRates) -> float:
    w = vocab_rows_per_rank(spec, tp) * spec.hidden_size
    return (matmul_time_s(2 * tokens * w, DTYPE_BYTES * w, r)
            + memory_time_s(tokens * (10 * vocab_rows_per_rank(spec, tp) + 4 * spec.hidden_size), r)
            + 4 * r.kernel_overhead_s)


def head_backward_s(spec: ModelSpec, tp: int, tokens: float, r: AnalyticRates) -> float:
    w = vocab_rows_per_rank(spec, tp) * spec.hidden_size
    return (matmul_time_s(4 * tokens * w, 2 * DTYPE_BYTES * w, r)
            + memory_time_s(tokens * (8 * vocab_rows_per_rank(spec, tp) + 8 * spec.hidden_size), r)
            + 6 * r.kernel_overhead_s)


def head_decode_s(spec: ModelSpec, tp: int, batch: float, r: AnalyticRates) -> float:
    w = vocab_rows_per_rank(spec, tp) * spec.hidden_size
    return matmul_time_s(2 * batch * w, DTYPE_BYTES * w, r) + 8 * r.decode_kernel_overhead_s


def decode_host_s(tp: int, ops: int, r: AnalyticRates) -> float:
    """Host time per step of a layer of ``ops`` eager ops: none where the step is one replayed graph (tp = 1)."""
    return 0.0 if tp == 1 else ops * r.host_op_s


def decode_capture_s(tp: int, ops: int, r: AnalyticRates) -> float:
    """One-off eager warm-up step + capture of a layer of ``ops`` ops (tp = 1 only: nothing is captured else)."""
    return 2 * ops * r.host_op_s if tp == 1 else 0.0


def sampling_s(spec: ModelSpec, tp: int, batch: float, mode: str, r: AnalyticRates) -> float:
    """Device time of drawing the next token from ``batch`` rows of padded-vocabulary logits; ``mode``:
    greedy, sample (top-k / top-p: sorts), sample_plain (temperature only)."""
    v = vocab_rows_per_rank(spec, tp) * tp
    if mode == "greedy":
        return memory_time_s(12 * batch * v, r) + GREEDY_OPS * r.decode_kernel_overhead_s
    if mode == "sample_plain":
        return memory_time_s(24 * batch * v, r) + PLAIN_SAMPLE_OPS * r.decode_kernel_overhead_s
    return memory_time_s(48 * batch * v, r) + SAMPLE_OPS * r.decode_kernel_overhead_s


def launch_host_s(tp: int, r: AnalyticRates) -> float:
    return (2 if tp == 1 else 6) * r.host_op_s


def score_head_s(spec: ModelSpec, tokens: float, r: AnalyticRates, passes: float = 1.0) -> float:
    return passes * (memory_time_s(6 * DTYPE_BYTES * tokens * spec.hidden_size, r) + 3 * r.kernel_overhead_s)


def embedding_forward_s(spec: ModelSpec, tokens: float, r: AnalyticRates) -> float:
    return memory_time_s(2 * DTYPE_BYTES * tokens * spec.hidden_size, r) + 2 * r.kernel_overhead_s


def embedding_backward_s(spec: ModelSpec, tokens: float, r: AnalyticRates) -> float:
    return memory_time_s(6 * DTYPE_BYTES * tokens * spec.hidden_size, r) + 3 * r.kernel_overhead_s


# -- tables ----------------------------------------------------------------------------------------
def _sig(x: float) -> float:
    """Five significant digits: the rates are not more precise, and the JSON stays small."""
    return float(f"{x:.5g}")


def _tok_table(fn) -> dict:
    return {"seqlen": list(SEQLEN_GRID), "tokens": list(TOKENS_GRID),
            "time_s": [[_sig(fn(t, s)) for t in TOKENS_GRID] for s in SEQLEN_GRID]}


def _dec_table(fn, kv_grid=KV_GRID) -> dict:
    return {"batch": list(BATCH_GRID), "kv_len": list(kv_grid),
            "time_s": [[_sig(fn(b, k)) for k in kv_grid] for b in BATCH_GRID]}


def _step_table(fn) -> dict:
    """A decode-step table (one kv_len column: the step's parts outside the layers do not depend on it)."""
    return _dec_table(lambda b, k: fn(b), KV_GRID[:1])


def analytic_layer_dicts(spec: ModelSpec, r: AnalyticRates, tps=TP_DEGREES) -> dict:
    """``{kind: {str(tp): {op: table dict}}}`` in the profile schema."""
    out: dict = {"embedding": {}, "block": {}, "head": {}, "score_head": {}, "decode_step": {}}
    for tp in tps:
        k = str(tp)
        out["embedding"][k] = {
            "forward": _tok_table(lambda t, s: embedding_forward_s(spec, t, r)),
            "backward": _tok_table(lambda t, s: embedding_backward_s(spec, t, r)),
            "prefill": _tok_table(lambda t, s: embedding_forward_s(spec, t, r)),
        }
        out["block"][k] = {
            "forward": _tok_table(lambda t, s, tp=tp: block_forward_s(spec, tp, t, s, r)),
            "backward": _tok_table(lambda t, s, tp=tp: block_backward_s(spec, tp, t, s, r)),
            "prefill": _tok_table(lambda t, s, tp=tp: block_prefill_s(spec, tp, t, s, r)),
            "decode": _dec_table(lambda b, kv, tp=tp: block_decode_s(spec, tp, b, kv, r)),
            "decode_host": _dec_table(lambda b, kv, tp=tp: decode_host_s(tp, EAGER_BLOCK_OPS, r)),
            "decode_capture": _dec_table(lambda b, kv, tp=tp: decode_capture_s(tp, EAGER_BLOCK_OPS, r)),
        }
        out["head"][k] = {
            "forward": _tok_table(lambda t, s, tp=tp: head_forward_s(spec, tp, t, r)),
            "backward": _tok_table(lambda t, s, tp=tp: head_backward_s(spec, tp, t, r)),
            "prefill": _tok_table(lambda t, s, tp=tp: head_forward_s(spec, tp, max(t / s, 1.0), r)),
            "decode": _dec_table(lambda b, kv, tp=tp: head_decode_s(spec, tp, b, r)),
            "decode_host": _dec_table(lambda b, kv, tp=tp: decode_host_s(tp, EAGER_HEAD_OPS, r)),
            "decode_capture": _dec_table(lambda b, kv, tp=tp: decode_capture_s(tp, EAGER_HEAD_OPS, r)),
        }
        out["score_head"][k] = {
            "forward": _tok_table(lambda t, s: score_head_s(spec, t, r)),
            "backward": _tok_table(lambda t, s: score_head_s(spec, t, r, 2.0)),
            "prefill": _tok_table(lambda t, s: score_head_s(spec, t, r)),
            "decode": _dec_table(lambda b, kv: score_head_s(spec, b, r)),
        }
        out["decode_step"][k] = {
            "launch": _step_table(lambda b: 4 * r.decode_kernel_overhead_s),
            "launch_host": _step_table(lambda b, tp=tp: launch_host_s(tp, r)),
            "capture": _step_table(lambda b, tp=tp: 2 * launch_host_s(tp, r)),
            "greedy": _step_table(lambda b, tp=tp: sampling_s(spec, tp, b, "greedy", r)),
            "greedy_host": _step_table(lambda b: GREEDY_OPS * r.host_op_s),
            "sample": _step_table(lambda b, tp=tp: sampling_s(spec, tp, b, "sample", r)),
            "sample_host": _step_table(lambda b: SAMPLE_OPS * r.host_op_s),
            "sample_plain": _step_table(lambda b, tp=tp: sampling_s(spec, tp, b, "sample_plain", r)),
            "sample_plain_host": _step_table(lambda b: PLAIN_SAMPLE_OPS * r.host_op_s),
        }
    return out


def analytic_layers(spec: ModelSpec, r: AnalyticRates, tps=TP_DEGREES) -> dict:
    """Loaded tables ``{kind: {tp: {op: Table2D}}}`` (what ``Profile.layers[key]`` holds)."""
    from planner.cost_model.profile import table_of

    problems: list[str] = []
    out: dict = {}
    for kind, per_tp in analytic_layer_dicts(spec, r, tps).items():
        for tp_s, ops in per_tp.items():
            out.setdefault(kind, {})[int(tp_s)] = {op: table_of(op, td, f"{kind}.{op}", problems)
                                                   for op, td in ops.items()}
    assert not problems, problems
    return out


def collective_rates(r: AnalyticRates, max_devices: int = 1024) -> dict:
    def entry(bw, lat, n):
        return {"bandwidth_bytes_per_s": r.link_efficiency * bw, "latency_s": lat * (1 + math.log2(max(n, 2)))}

    sizes = [2 ** k for k in range(1, int(math.log2(max_devices)) + 1)]
    return {"nvlink": {str(n): entry(r.nvlink_bandwidth_bytes_per_s, r.nvlink_latency_s, n) for n in (2, 4, 8)},
            "ib": {str(n): entry(r.ib_bandwidth_bytes_per_s, r.ib_latency_s, n) for n in sizes},
            "host": {"1": {"bandwidth_bytes_per_s": r.host_bandwidth_bytes_per_s, "latency_s": r.host_latency_s}}}


def analytic_profile_dict(r: AnalyticRates, specs: list[ModelSpec], device: str, dtype: str = "bf16") -> dict:
    from planner.cost_model.profile import PROFILE_FORMAT, PROFILE_VERSION, shape_key, shape_of

    models = {}
    for spec in specs:
        models.setdefault(shape_key(spec), {"shape": shape_of(spec), "layers": analytic_layer_dicts(spec, r)})
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "source": "analytic", "device": device,
            "dtype": dtype, "includes_tp_comm": False,
            "notes": f"ANALYTIC, not measured: roofline from {r.name} rates "
                     f"(planner/cost_model/analytic_profile.py docstring has the formulas).",
            "rates": r.to_dict(), "models": models,
            "optimizer": {"time_s_per_param": ADAM_BYTES_PER_PARAM / (r.mem_efficiency * r.mem_bandwidth_bytes_per_s)},
            "collectives": collective_rates(r)}


def empty_analytic_profile(r: AnalyticRates, device: Optional[str] = None, dtype: str = "bf16"):
    """An analytic profile with no model entries yet (they are filled on first use). Its layer times
    count bf16 traffic whatever ``dtype`` says (an order of magnitude for fp32 CPU runs)."""
    from planner.cost_model.profile import profile_from_dict

    return profile_from_dict(analytic_profile_dict(r, [], device or r.name, dtype), where=f"analytic profile ({r.name})")


def preset_specs() -> list[ModelSpec]:
    from reallm.spec import preset_spec

    return [preset_spec(c, s) for (c, s) in PRESETS]


def compact_json(d: dict) -> str:
    """Indented JSON with every list of numbers on one line (keeps the tables readable)."""
    text = json.dumps(d, indent=1)
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="profiles/h100_analytic.json")
    args = ap.parse_args(argv)
    d = analytic_profile_dict(AnalyticRates.h100(), preset_specs(), device="NVIDIA H100 80GB HBM3")
    with open(args.out, "w") as f:
        f.write(compact_json(d) + "\n")
    print(f"wrote {args.out}: {len(d['models'])} model shapes, tp {list(TP_DEGREES)} (source: analytic)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
