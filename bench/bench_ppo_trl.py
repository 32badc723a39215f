"""TRL's PPO trainer on the workload of ``bench_ppo_gpu.py`` (issue 12 item 4's baseline).

    PYTHONPATH=/tmp/trl_site:$PWD python bench/bench_ppo_trl.py --out /tmp/ppo_bench [--json trl.json] \\
        [--ours ours.json]                     # one GPU; --ours prints the comparison table last
    PYTHONPATH=/tmp/trl_site .venv/bin/python bench/bench_ppo_trl.py --quick --out /tmp/ppo_bench_quick

TRL 1.12.0 (``trl.experimental.ppo``; the last release with a PPO trainer: 1.13 removed it), installed
with --no-deps from ``.whl/trl/`` (trl, datasets 4.8.5, dill, multiprocess) into a throwaway
``--target`` directory, never into .venv. Its generation backend is transformers' ``generate`` (no vLLM
in its PPO trainer). Same checkpoint, tokenizer, prompt token ids, batch, prompt and generation lengths
as ours (``bench_ppo_gpu.prepare_assets`` / ``prompt_token_ids``).

TRL setup, chosen for TRL's best case and to match our algorithm where the work depends on it:
- models loaded in bf16 (the dtype of the checkpoint, as TRL's own ``examples/scripts/ppo/ppo.py`` does
  with ``dtype=auto``), bf16=True: policy and value train in pure bf16 (bf16 Adam states; ours keeps fp32
  masters and Adam moments: more work for us);
- policy ``AutoModelForCausalLM``; value and reward ``AutoModelForSequenceClassification`` (num_labels=1)
  of the same checkpoint; a separate ref model;
- ``per_device_train_batch_size`` = batch, ``gradient_accumulation_steps`` 1, ``num_mini_batches`` = our
  ppo_n_minibatches, ``num_ppo_epochs`` 1: one pass, one optimizer step per minibatch, as ours;
- the whole batch generated at once (``local_rollout_forward_batch_size`` = batch, TRL's fastest setting),
  falling back to halves if that does not fit (``--rollout-batch``);
- ``stop_token`` None (the model's eos_token_id is cleared: no early stop, exactly ``response_length``
  tokens), temperature 1, no top-k / top-p; gradient checkpointing off; no sample generations, no saving.

Per-step breakdown: module-level functions of ``trl.experimental.ppo.ppo_trainer`` are wrapped with a device
synchronisation and a timer: ``batch_generation`` (gen), ``forward`` on the ref model (ref_inf),
``get_reward`` on the value model (critic_inf) and on the reward model (rew_inf). ``train`` is the time from
the end of the step's last rollout call to the step's end (TRL trains policy and value jointly, one backward
through both; advantages/GAE are in it too); ``other`` = wall − all of those (log-probs of the sampled
tokens from the stored scores, masking). The step's wall time is measured between ``on_step_end``
callbacks. Memory: the device's peak allocated bytes in each phase (reset before each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo_gpu import (  # noqa: E402
    GIB,
    Workload,
    add_workload_args,
    prepare_assets,
    print_ours,
    prompt_token_ids,
    workload_from_args,
)

PHASES = ("gen", "ref_inf", "critic_inf", "rew_inf", "train", "other")


class PhaseTimer:
    """Per step: seconds and peak device bytes of each phase (see the module docstring)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.steps: list[dict] = []
        self._reset_step(time.perf_counter())

    def _reset_step(self, now: float) -> None:
        self.step_start = now
        self.last_end = now
        self.times = {p: 0.0 for p in PHASES}
        self.peaks = {p: 0 for p in PHASES}
        self.gen_tokens = 0
        self.gen_shape = None
        self._mark()

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _mark(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int:
        return self.torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def wrap(self, fn, phase_of):
        """``fn`` timed as phase ``phase_of(*args)`` (None: not timed)."""

        def timed(*args, **kwargs):
            phase = phase_of(*args)
            if phase is None:
                return fn(*args, **kwargs)
            self._sync()
            self._mark()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            t1 = time.perf_counter()
            self.times[phase] += t1 - t0
            self.peaks[phase] = max(self.peaks[phase], self._peak())
            self.last_end = t1
            self._mark()  # from here to the next timed call (or the step end): "train" when nothing follows
            if phase == "gen":
                self.gen_shape = tuple(out[0].shape)
            return out

        return timed

    def end_step(self, batch_size: int, prompt_len: int) -> None:
        self._sync()
        now = time.perf_counter()
        train = now - self.last_end
        self.times["train"] = train
        self.peaks["train"] = self._peak()
        wall = now - self.step_start
        self.times["other"] = wall - sum(self.times[p] for p in PHASES if p != "other")
        gen_len = self.gen_shape[1] - prompt_len if self.gen_shape else 0
        self.steps.append({"wall_s": wall, "times_s": dict(self.times), "peak_bytes": dict(self.peaks),
                           "gen_tokens": batch_size * gen_len, "tokens": batch_size * (prompt_len + gen_len),
                           "gen_len": gen_len})
        self._reset_step(now)


def run_trl(w: Workload, assets: dict, out: str, on_gpu: bool, rollout_batch: Optional[int]) -> dict:
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    ck = assets["ckpt"]
    policy = AutoModelForCausalLM.from_pretrained(ck, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(ck, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(ck, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(ck, num_labels=1, dtype=dtype)
    ids = prompt_token_ids(assets["data"], assets["tokenizer"], w.prompt_len)
    train_set = [{"input_ids": x} for x in ids]  # a map-style dataset: all the DataLoader needs
    rb = rollout_batch or w.batch_size
    cfg = PPOConfig(
        output_dir=os.path.join(out, "trl"), per_device_train_batch_size=w.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=w.n_minibatches, num_ppo_epochs=1, total_episodes=w.batch_size * w.steps,
        local_rollout_forward_batch_size=rb, response_length=w.gen_len, stop_token=None, temperature=1.0,
        num_sample_generations=0, gradient_checkpointing=False, bf16=on_gpu, use_cpu=not on_gpu, report_to=[],
        save_strategy="no", logging_steps=1, seed=w.seed, kl_coef=0.1, lam=1.0, gamma=1.0, cliprange=0.2,
        cliprange_value=0.2, learning_rate=1e-5, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train_set, eval_dataset=train_set[:1])

    timer = PhaseTimer(device)

    def reward_phase(model, *_):
        return "rew_inf" if model is trainer.reward_model else "critic_inf"

    ppo_mod.batch_generation = timer.wrap(ppo_mod.batch_generation, lambda *a: "gen")
    ppo_mod.get_reward = timer.wrap(ppo_mod.get_reward, reward_phase)
    ppo_mod.forward = timer.wrap(ppo_mod.forward, lambda model, *a: "ref_inf" if model is trainer.ref_model else None)

    class StepEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timer._reset_step(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            timer.end_step(w.batch_size, w.prompt_len)

    trainer.add_callback(StepEnd())
    t0 = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t0
    steps = timer.steps
    measured = [s for i, s in enumerate(steps, 1) if i in w.measured_steps]
    if not measured:
        raise SystemExit(f"TRL ran {len(steps)} steps; none of {w.measured_steps}")
    n, wall = len(measured), sum(s["wall_s"] for s in measured)
    gen_lens = {s["gen_len"] for s in steps}
    attn = getattr(policy.config, "_attn_implementation", None)
    return {
        "system": "trl", "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "generation_backend": f"transformers generate (attention {attn}, "
                              f"cache {policy.generation_config.cache_implementation or 'dynamic'}; no vLLM)",
        "rollout_batch": rb, "measured_steps": [i for i in range(1, len(steps) + 1) if i in w.measured_steps],
        "gen_lens": sorted(gen_lens), "step_wall_s": wall / n, "run_s": total_s,
        "first_step_wall_s": steps[0]["wall_s"],
        "gen_tokens_per_s": sum(s["gen_tokens"] for s in measured) / wall,
        "tokens_per_s": sum(s["tokens"] for s in measured) / wall,
        "per_phase_s": {p: sum(s["times_s"][p] for s in measured) / n for p in PHASES},
        "peak_gib": {p: max(s["peak_bytes"][p] for s in measured) / GIB for p in PHASES if p != "other"},
    }


def print_trl(w: Workload, s: dict) -> None:
    print(f"\n## TRL {s['trl']} PPO, batch {w.batch_size} × ({w.prompt_len} + {w.gen_len}) tokens "
          f"(generated lengths {s['gen_lens']}), rollout batch {s['rollout_batch']}, steps {s['measured_steps']}")
    print(f"generation: {s['generation_backend']}")
    print(f"step {s['step_wall_s']:.3f} s (first step {s['first_step_wall_s']:.2f} s)  generated tokens/s "
          f"{s['gen_tokens_per_s']:.0f}  total tokens/s {s['tokens_per_s']:.0f}")
    print("| phase | time s | share | peak GiB |")
    print("|---|---|---|---|")
    for p in PHASES:
        t = s["per_phase_s"][p]
        peak = s["peak_gib"].get(p)
        print(f"| {p} | {t:.3f} | {t / s['step_wall_s']:.0%} | {'-' if peak is None else f'{peak:.2f}'} |")


def print_comparison(ours: dict, theirs: dict) -> None:
    """The summary table: ours vs TRL, per call (TRL's train is actor + critic, jointly)."""
    o, t = ours["per_call_s"], theirs["per_phase_s"]
    rows = [("generation (actor_gen / gen)", o["actor_gen"], t["gen"]),
            ("rew_inf", o["rew_inf"], t["rew_inf"]), ("ref_inf", o["ref_inf"], t["ref_inf"]),
            ("critic_inf", o["critic_inf"], t["critic_inf"]),
            ("actor_train + critic_train / train", o["actor_train"] + o["critic_train"], t["train"]),
            ("realloc", ours["realloc_s"], None), ("other", ours["other_s"], t["other"]),
            ("step (wall)", ours["step_wall_s"], theirs["step_wall_s"])]
    print("\n## reallm vs TRL (seconds per step; lower is better)")
    print("| part | reallm s | TRL s | TRL / reallm |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        ratio = "-" if b is None or a <= 0 else f"{b / a:.2f}x"
        print(f"| {name} | {a:.3f} | {'-' if b is None else f'{b:.3f}'} | {ratio} |")
    print("| generated tokens/s | {:.0f} | {:.0f} | {:.2f}x (reallm / TRL) |".format(
        ours["gen_tokens_per_s"], theirs["gen_tokens_per_s"], ours["gen_tokens_per_s"] / theirs["gen_tokens_per_s"]))
    sp = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print(f"| total tokens/s | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | {sp:.2f}x (reallm / TRL) |")
    print(f"target ≥ 3x total tokens/s: {'met' if sp >= 3 else 'NOT met'} ({sp:.2f}x)")
    if ours.get("peak_gib"):
        step_peak, step_est = max(ours["peak_gib"].values()), max(ours["estimate_peak_gib"].values())
        print(f"memory: reallm step peak {step_peak:.2f} GiB, planner estimate {step_est:.2f} GiB "
              f"({step_peak / step_est - 1:+.1%}); TRL step peak {max(theirs['peak_gib'].values()):.2f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--rollout-batch", type=int, help="TRL's local_rollout_forward_batch_size (default: batch)")
    ap.add_argument("--ours", help="bench_ppo_gpu.py's --json output: print the comparison table last")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    w = workload_from_args(args)
    on_gpu = not args.quick
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no GPU here: use --quick for the CPU check")
    if not on_gpu:
        torch.set_num_threads(1)
    assets = prepare_assets(args.out, w, on_gpu)
    s = None
    try:
        s = run_trl(w, assets, args.out, on_gpu, args.rollout_batch)
    except torch.cuda.OutOfMemoryError:
        if args.rollout_batch or w.batch_size < 2:
            raise
    if s is None:  # retried outside the handler, so the failed run's traceback no longer holds its tensors
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        print(f"TRL ran out of memory generating {w.batch_size} at once; again with {w.batch_size // 2}", flush=True)
        s = run_trl(w, assets, args.out, on_gpu, w.batch_size // 2)
    s["workload"] = w.to_dict()
    s["device"] = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    print_trl(w, s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        if ours.get("workload") != s["workload"]:
            print(f"warning: workloads differ:\n ours {ours.get('workload')}\n trl  {s['workload']}")
        print_ours(w, ours)
        print_comparison(ours, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
