"""Our PPO end to end on one device (issue 12 items 4 and 5, issue 8's memory check).

    PYTHONPATH=$PWD python bench/bench_ppo_gpu.py --out /tmp/ppo_bench [--json ours.json]   # one GPU
    .venv/bin/python bench/bench_ppo_gpu.py --quick --out /tmp/ppo_bench_quick              # CPU, tiny

Models: one random-weight HF checkpoint of Qwen2-0.5B's shape (24 layers, hidden 896, 14/2 heads,
intermediate 4864, tied embeddings, its real 151 936-token vocabulary; 494 M parameters, bf16) serves all
four roles: actor and ref load it as a causal LM, critic and reward as the same trunk with a fresh scalar
head (``type.is_critic``), which is how TRL builds its value and reward models too. The tokenizer is the
tiny offline one (384 tokens, ``reallm.assets``): it only encodes the prompts and names BOS/EOS/pad.
Sampled ids above 383 are never decoded (the reward is a model, not a rule), so the model keeps a real
vocabulary and its real logits cost; both benchmarks see the same token ids.

Workload (``Workload``): every prompt exactly ``prompt_len`` tokens (digit strings, one token per digit,
truncated from the left as ``dataset.max_prompt_len`` does), exactly ``gen_len`` new tokens (EOS banned
until then: min_new_tokens = max_new_tokens), pure sampling at temperature 1 (no top-k / top-p, so no
logits mask: ``ppo.force_no_logits_mask``), ``ppo_n_minibatches`` updates per step, no gradient
checkpointing. The plan is ``d1p1m1``: all six calls colocated on the one device. On one device the
heuristic plan is the same placement for every call (and ``search`` has no other candidate), so it is
planned and compared, not run twice.

Figures, over the measured steps (after ``warmup`` steps; the last step is also left out when more than
one remains, because it writes the final HF checkpoints inside the train calls):
- step wall time: rank 0's time between consecutive ``end_step`` (a thin ``PPORuntime`` subclass);
- generated tokens/s = Σ gen_tokens / Σ wall; total tokens/s = Σ (prompt + generated tokens) / Σ wall;
- per call: ``time_{call}_s`` from metrics.jsonl (the executor synchronises the device after each call),
  ``realloc_{call}_s``; ``other`` = wall − calls − reallocations (data transfer, metrics);
- memory: ``mem/peak_gib/{call}`` (``torch.cuda.max_memory_allocated`` reset before the call) against the
  planner's per-call ``peak_memory_bytes`` (``planner.search.estimate_plan``), and issue 8's bound for
  actor_gen: generation weights + KV cache + 10 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from reallm.algorithms.ppo import PPORuntime  # noqa: E402
from reallm.assets.checkpoints import TinyModel, hf_config  # noqa: E402

CALLS = ("actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train")
GIB = float(2**30)

#: Qwen2-0.5B's shape (vocabulary set separately).
QWEN2_05B = TinyModel("qwen2_0.5b", "qwen2", 24, 896, 4864, 14, 2, tie_word_embeddings=True)
QWEN2_05B_VOCAB = 151936
TINY = TinyModel("qwen2_tiny", "qwen2", 2, 64, 160, 4, 2, tie_word_embeddings=True)
TINY_VOCAB = 512  # above the tokenizer's 384, as in the full run


@dataclass(frozen=True)
class Workload:
    """What both benchmarks run: the same for ours and TRL's."""

    shape: TinyModel
    vocab_size: int
    batch_size: int  # prompts per step
    prompt_len: int
    gen_len: int
    steps: int
    warmup_steps: int
    n_minibatches: int
    seed: int = 1

    @property
    def measured_steps(self) -> list[int]:
        """1-based steps that count: after the warm-up, and without the last one (final checkpoint save)
        when at least two would remain."""
        steps = list(range(self.warmup_steps + 1, self.steps + 1))
        return steps[:-1] if len(steps) >= 2 else steps

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = dataclasses.asdict(self.shape)
        return d


FULL = Workload(QWEN2_05B, QWEN2_05B_VOCAB, batch_size=128, prompt_len=128, gen_len=256, steps=5, warmup_steps=1,
                n_minibatches=8)
QUICK = Workload(TINY, TINY_VOCAB, batch_size=8, prompt_len=16, gen_len=8, steps=2, warmup_steps=1, n_minibatches=2)


def workload_from_args(args) -> Workload:
    w = QUICK if args.quick else FULL
    for k in ("batch_size", "prompt_len", "gen_len", "steps", "warmup_steps", "n_minibatches"):
        v = getattr(args, k, None)
        if v is not None:
            w = dataclasses.replace(w, **{k: v})
    return w


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="tiny models on CPU, 2 steps (checks the script)")
    ap.add_argument("--out", required=True, help="work directory (checkpoint, data, outputs)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--gen-len", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--n-minibatches", type=int)
    ap.add_argument("--json", help="write the results here")


# -- assets: tokenizer, one random checkpoint, prompts --------------------------------------------------------


def prepare_assets(root: str, w: Workload, on_gpu: bool) -> dict:
    """Tokenizer, the checkpoint every role loads, the prompts file; reused when already there."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from reallm.assets.tokenizer import save_tokenizer, train_tokenizer

    tok_dir, ckpt = os.path.join(root, "tokenizer"), os.path.join(root, f"ckpt_{w.shape.name}_v{w.vocab_size}")
    data = os.path.join(root, f"prompts_{w.batch_size * w.steps}x{w.prompt_len}.jsonl")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        save_tokenizer(train_tokenizer(), tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        cfg = hf_config(w.shape, w.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                        max_position_embeddings=max(4096, w.prompt_len + w.gen_len))
        cfg.initializer_range = 0.02  # HF's default: sane activations at this width (the tiny assets use 0.125)
        torch.manual_seed(w.seed)
        dtype = torch.bfloat16 if on_gpu else torch.float32
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        tmp = ckpt + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for f in os.listdir(tok_dir):
            shutil.copyfile(os.path.join(tok_dir, f), os.path.join(tmp, f))
        os.replace(tmp, ckpt)
        n = sum(p.numel() for p in model.parameters())
        print(f"wrote {ckpt}: {n / 1e6:.1f} M parameters, {dtype}, in {time.perf_counter() - t0:.1f} s", flush=True)
        del model
    if not os.path.exists(data):
        rng = random.Random(w.seed)
        with open(data + ".tmp", "w") as f:
            for _ in range(w.batch_size * w.steps):  # one digit = one token; the left end is cut off
                f.write(json.dumps({"prompt": "".join(rng.choice("0123456789") for _ in range(w.prompt_len + 8))})
                        + "\n")
        os.replace(data + ".tmp", data)
    return {"tokenizer": tok_dir, "ckpt": ckpt, "data": data}


def prompt_token_ids(data_path: str, tok_path: str, prompt_len: int) -> list[list[int]]:
    """The token ids our PPO trains on (``reallm.algorithms.data.tokenize_prompts``), for TRL to use as is."""
    from reallm.algorithms.data import load_tokenizer, tokenize_prompts
    from reallm.datasets import read_records

    samples = tokenize_prompts(read_records(data_path, "prompt", "dataset.path"), load_tokenizer(tok_path), prompt_len)
    ids = [list(s.tokens) for s in samples]
    bad = [len(x) for x in ids if len(x) != prompt_len]
    if bad:
        raise SystemExit(f"prompts must all be {prompt_len} tokens; got lengths {sorted(set(bad))}")
    return ids


# -- our run ----------------------------------------------------------------------------------------------------


class TimedPPORuntime(PPORuntime):
    """``PPORuntime`` that also records each step's wall time on rank 0 (``bench/step_wall_s``; the first
    step's includes building the models)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bench_last_s = time.perf_counter()

    def run_call(self, ctx, batch):
        if (os.environ.get(CENSUS_ENV) == "1" and self.rank == 0 and self.device.type == "cuda" and ctx.step == 2
                and ctx.call.name == "actor_gen"):  # gc + a tensor walk: slows that step; off by default
            try:
                print(memory_census(self), flush=True)
            except Exception as e:  # noqa: BLE001 - a diagnostic must not stop the benchmark
                print(f"memory census failed: {type(e).__name__}: {e}", flush=True)
        peak_trace = os.environ.get(PEAK_TRACE_ENV)
        if peak_trace and self.rank == 0 and self.device.type == "cuda" and ctx.step == 2 and ctx.call.name == peak_trace:
            import torch

            from bench.profiling import peak_attribution

            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
            try:
                out = super().run_call(ctx, batch)
                torch.cuda.synchronize()
                print(f"allocation peak of {peak_trace}, step 3:\n"
                      + peak_attribution(torch.cuda.memory._snapshot(), base), flush=True)
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
            return out
        return super().run_call(ctx, batch)

    def end_step(self, step: int, rank: int) -> None:
        if rank == 0:
            now = time.perf_counter()
            self.record(step, {"bench/step_wall_s": now - self._bench_last_s})
            self._bench_last_s = now
        super().end_step(step, rank)


def memory_census(rt: PPORuntime) -> str:
    """What is resident on the device right before a call: the model handles' buffers, then every live CUDA
    tensor found by the garbage collector grouped by (shape, dtype), before and after ``gc.collect()``."""
    import gc

    import torch

    lines = [f"memory census before actor_gen of step 3: allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB"]
    for name, h in rt.models.items():
        pm = h.pm
        opt = pm.optimizer
        states = {} if opt is None or pm.offloaded else {k: v for k, v in opt.state_tensors().items()}
        st_bytes = sum(v.numel() * v.element_size() for v in states.values() if v.device.type == "cuda")
        grads = getattr(opt, "grads", None) if opt is not None else None
        g_bytes = grads.numel() * grads.element_size() if grads is not None and not pm.offloaded else 0
        lines.append(f"  handle {name}: offloaded={pm.offloaded} flat {pm.flat.numel() * pm.flat.element_size() / GIB:.2f}"
                     f" GiB ({pm.flat.dtype}), grads {g_bytes / GIB:.2f} GiB, optimizer states {st_bytes / GIB:.2f} GiB "
                     f"({', '.join(f'{k}:{v.dtype}' for k, v in states.items())})")

    def live() -> dict:
        seen, groups = set(), {}
        for o in gc.get_objects():
            try:
                if not (torch.is_tensor(o) and o.is_cuda):
                    continue
                st = o.untyped_storage()
                key = st.data_ptr()
                if key in seen or st.nbytes() == 0:
                    continue
                seen.add(key)
                g = groups.setdefault((tuple(o.shape), str(o.dtype)), [0, 0])
                g[0] += 1
                g[1] += st.nbytes()
            except Exception:  # noqa: BLE001 - odd objects in gc: skip
                continue
        return groups

    for when in ("live", "after gc.collect()"):
        if when != "live":
            gc.collect()
        groups = live()
        total = sum(b for _, b in groups.values())
        lines.append(f"  {when}: allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB, tensors found "
                     f"{total / GIB:.2f} GiB; largest:")
        for (shape, dt), (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]:
            lines.append(f"    {n} x {list(shape)} {dt}: {b / GIB:.3f} GiB")
    return "\n".join(lines)


def _timed_runtime(plan_path, plan, rank, device):
    return TimedPPORuntime(plan, rank, device, plan_path)


def ppo_overrides(w: Workload, assets: dict, out: str, allocation_mode: str, on_gpu: bool, trial: str) -> list[str]:
    ck = assets["ckpt"]
    return [
        f"cluster={'h100' if on_gpu else 'cpu'}", "n_gpus_per_node=1", f"allocation_mode={allocation_mode}",
        f"actor.path={ck}", f"ref.path={ck}", f"critic.path={ck}", f"rew.path={ck}",
        "actor.gradient_checkpointing=False", "critic.gradient_checkpointing=False",
        f"dataset.path={assets['data']}", f"dataset.max_prompt_len={w.prompt_len}",
        f"dataset.train_bs_n_seqs={w.batch_size}", "total_train_epochs=1", "save_freq_steps=null",
        "save_freq_epochs=null", f"ppo.max_new_tokens={w.gen_len}", f"ppo.min_new_tokens={w.gen_len}",
        "ppo.greedy=False", "ppo.temperature=1.0", "ppo.top_k=0", "ppo.top_p=1.0", "ppo.force_no_logits_mask=True",
        f"ppo.ppo_n_minibatches={w.n_minibatches}", f"seed={w.seed}", f"output_dir={out}",
        "experiment_name=bench-ppo", f"trial_name={trial}",
    ] + MEMORY_POLICIES[MEMORY_POLICY]


#: ``--memory``: resident keeps every model and training state on the GPU between calls (as TRL does; the
#: fastest when everything fits); lean keeps on the GPU only what the running call needs (issue 8).
MEMORY_POLICIES = {
    "resident": ["memory.offload_train_state=false", "memory.offload_frozen_models=false",
                 "memory.offload_idle_train_states=false"],
    "lean": ["memory.offload_train_state=true", "memory.offload_frozen_models=true",
             "memory.offload_idle_train_states=true"],
}
MEMORY_POLICY = "resident"
#: Diagnostics for the workers (spawned on GPU, so passed in the environment): ``--census``, ``--peak-trace``.
CENSUS_ENV, PEAK_TRACE_ENV = "REALLM_BENCH_CENSUS", "REALLM_BENCH_PEAK_TRACE"


def planned(exp_overrides: list[str]):
    """(experiment, plan with the cost model's estimates)."""
    from planner.allocation import make_plan
    from planner.search import estimate_plan
    from reallm.config.parse import parse_experiment
    from reallm.config.resolve import resolve
    from reallm.datasets import check_experiment_datasets

    cfg = parse_experiment("ppo", exp_overrides)
    check_experiment_datasets("ppo", cfg)
    exp = resolve("ppo", cfg)
    return exp, estimate_plan(exp, make_plan(exp))


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(w: Workload, rows: list[dict]) -> dict:
    """Throughput and per-call times over the measured steps (means per step)."""
    by_step = {int(r["step"]): r for r in rows}
    steps = [s for s in w.measured_steps if s in by_step]
    if not steps:
        raise SystemExit(f"no measured step in metrics (have {sorted(by_step)}, want {w.measured_steps})")
    ms = [by_step[s] for s in steps]
    wall = sum(r["bench/step_wall_s"] for r in ms)
    gen_tokens = sum(r["gen_tokens"] for r in ms)
    all_tokens = sum(r["num_tokens"] for r in ms)
    n = len(ms)
    per_call = {c: sum(r.get(f"time_{c}_s", 0.0) for r in ms) / n for c in CALLS}
    realloc = sum(v for r in ms for k, v in r.items() if k.startswith("realloc_") and k.endswith("_s")) / n
    step_s = wall / n
    return {
        "measured_steps": steps, "step_wall_s": step_s, "gen_tokens_per_step": gen_tokens / n,
        "tokens_per_step": all_tokens / n, "gen_tokens_per_s": gen_tokens / wall, "tokens_per_s": all_tokens / wall,
        "per_call_s": per_call, "realloc_s": realloc,
        "other_s": step_s - sum(per_call.values()) - realloc,
        "peak_gib": {c: max(r[f"mem/peak_gib/{c}"] for r in ms) for c in CALLS if f"mem/peak_gib/{c}" in ms[0]},
        "start_gib": {c: max(r[f"mem/start_gib/{c}"] for r in ms) for c in CALLS if f"mem/start_gib/{c}" in ms[0]},
        "first_step_wall_s": by_step[1]["bench/step_wall_s"] if 1 in by_step else None,
    }


def gen_bound_bytes(plan) -> dict:
    """Issue 8's bound for a colocated actor_gen: generation weights + KV cache (+ 10 %)."""
    from planner.cost_model.memory import kv_cache_bytes, weights_bytes
    from planner.cost_model.shapes import DTYPE_BYTES, max_params_per_device, prompt_len, seqs_per_rank

    call = plan.call("actor_gen")
    p = plan.placements["actor_gen"]
    spec = plan.models["actor"]
    d = DTYPE_BYTES if plan.cluster.device_kind == "gpu" else 4
    w = weights_bytes(max_params_per_device(spec, p.tp, p.pp), d)
    kv = kv_cache_bytes(spec, p.tp, spec.num_layers // p.pp, seqs_per_rank(call, p.dp),
                        prompt_len(call) + call.max_new_tokens, d)
    return {"weights_bytes": w, "kv_bytes": kv, "bound_bytes": 1.1 * (w + kv)}


def run_ours(w: Workload, assets: dict, out: str, on_gpu: bool, allocation_mode: str = "d1p1m1") -> dict:
    from executor.launch import launch
    from reallm.algorithms.base import trial_dir_of

    trial = f"{allocation_mode}_b{w.batch_size}_p{w.prompt_len}_g{w.gen_len}"
    overrides = ppo_overrides(w, assets, out, allocation_mode, on_gpu, trial)
    exp, plan = planned(overrides)
    logits_mask = "packed_logits_mask" in plan.call("actor_gen").outputs
    if logits_mask:
        # The dataflow graph still routes the mask when ppo.force_no_logits_mask is set, and actor_gen then does
        # not produce it (the run fails on the missing key): produce it. With no top-k / top-p it marks only the
        # banned EOS, but it is a [tokens, vocab] bool tensor made, moved and read by ref_inf and actor_train.
        overrides = [o.replace("ppo.force_no_logits_mask=True", "ppo.force_no_logits_mask=False") for o in overrides]
        exp, plan = planned(overrides)
        print("note: running with the logits mask (force_no_logits_mask=True is not routed by the dataflow graph)",
              flush=True)
    heur = None
    try:
        _, heur_plan = planned([o for o in overrides if not o.startswith("allocation_mode=")]
                               + ["allocation_mode=heuristic"])
        heur = {c.name: (heur_plan.placements[c.name].layout_str, heur_plan.placements[c.name].num_micro_batches)
                for c in plan.calls}
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the benchmark is the d1p1m1 run
        heur = {"error": f"{type(e).__name__}: {e}"}
    out_dir = trial_dir_of(exp.config)
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, "plan.json")
    plan.save(plan_path)
    PPORuntime.check_plan(plan)
    print(f"plan {allocation_mode}: " + ", ".join(f"{c.name} {plan.placements[c.name].layout_str}"
                                                  f"/mb{plan.placements[c.name].num_micro_batches}"
                                                  for c in plan.calls), flush=True)
    print(f"heuristic plan on this cluster: {heur}", flush=True)
    t0 = time.perf_counter()
    rc = launch(plan, plan_path=plan_path, runtime_factory=functools.partial(_timed_runtime, plan_path))
    total_s = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"our PPO run failed (exit {rc})")
    s = summarize(w, read_metrics(os.path.join(out_dir, "metrics.jsonl")))
    est = {c: plan.call_estimates[c]["peak_memory_bytes"] / GIB for c in CALLS}
    s.update({
        "system": "reallm", "allocation_mode": allocation_mode, "run_s": total_s, "plan_path": plan_path,
        "logits_mask": logits_mask,
        "heuristic_layouts": heur,
        "estimate_peak_gib": est, "estimate_step_time_s": plan.estimate.get("step_time_s"),
        "estimate_call_time_s": {c: plan.call_estimates[c]["time_s"] for c in CALLS},
        "gen_bound": {k: v / GIB for k, v in gen_bound_bytes(plan).items()},
        "params": {r: plan.models[r].num_params for r in ("actor", "critic")},
    })
    return s


# -- report -----------------------------------------------------------------------------------------------------


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_ours(w: Workload, s: dict) -> None:
    print(f"\n## reallm PPO, {s['allocation_mode']}, batch {w.batch_size} × ({w.prompt_len} + {w.gen_len}) tokens, "
          f"{w.n_minibatches} minibatches, steps {s['measured_steps']} of {w.steps}")
    print(f"step {s['step_wall_s']:.3f} s (estimate {_fmt(s['estimate_step_time_s'], '.3f')} s; first step "
          f"{_fmt(s['first_step_wall_s'])} s)  generated tokens/s {s['gen_tokens_per_s']:.0f}  "
          f"total tokens/s {s['tokens_per_s']:.0f}")
    print("| call | time s | share | est. time s | peak GiB | at start GiB | est. peak GiB | peak / est. |")
    print("|---|---|---|---|---|---|---|---|")
    for c in CALLS:
        t = s["per_call_s"][c]
        peak = s["peak_gib"].get(c)
        est = s["estimate_peak_gib"][c]
        ratio = None if peak is None else peak / est
        print(f"| {c} | {t:.3f} | {t / s['step_wall_s']:.0%} | {s['estimate_call_time_s'][c]:.3f} | {_fmt(peak)} | "
              f"{_fmt(s['start_gib'].get(c))} | {est:.2f} | {_fmt(ratio)} |")
    print(f"| realloc | {s['realloc_s']:.3f} | {s['realloc_s'] / s['step_wall_s']:.0%} | | | | | |")
    print(f"| other | {s['other_s']:.3f} | {s['other_s'] / s['step_wall_s']:.0%} | | | | | |")
    if s["peak_gib"]:
        peak = max(s["peak_gib"].values())
        est = max(s["estimate_peak_gib"].values())
        print(f"step peak {peak:.2f} GiB vs estimate {est:.2f} GiB: {peak / est - 1:+.1%} "
              f"({'within' if abs(peak / est - 1) <= 0.10 else 'outside'} 10 %)")
        g = s["gen_bound"]
        gp = s["peak_gib"].get("actor_gen")
        print(f"issue 8: actor_gen peak {gp:.2f} GiB vs gen weights {g['weights_bytes']:.2f} + KV {g['kv_bytes']:.2f} "
              f"+ 10 % = {g['bound_bytes']:.2f} GiB: {'ok' if gp <= g['bound_bytes'] else 'exceeded'}; "
              f"resident at its start {s['start_gib']['actor_gen']:.2f} GiB, growth during it "
              f"{gp - s['start_gib']['actor_gen']:.2f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--allocation-mode", default="d1p1m1")
    ap.add_argument("--memory", choices=sorted(MEMORY_POLICIES), default="resident",
                    help="memory policy (MEMORY_POLICIES); lean is the issue-8 measurement")
    ap.add_argument("--census", action="store_true", help="print the live CUDA tensors before step 3's actor_gen")
    ap.add_argument("--peak-trace", metavar="CALL", help="record step 3's CALL (e.g. actor_gen) and print who "
                    "holds the memory at its allocation peak")
    args = ap.parse_args(argv)
    global MEMORY_POLICY
    MEMORY_POLICY = args.memory
    if args.census:
        os.environ[CENSUS_ENV] = "1"
    if args.peak_trace:
        os.environ[PEAK_TRACE_ENV] = args.peak_trace
    w = workload_from_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    on_gpu = not args.quick
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no GPU here: use --quick for the CPU check")
    assets = prepare_assets(args.out, w, on_gpu)
    s = run_ours(w, assets, os.path.join(args.out, "runs"), on_gpu, args.allocation_mode)
    s["workload"] = w.to_dict()
    s["device"] = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    s["torch"] = torch.__version__
    print_ours(w, s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
