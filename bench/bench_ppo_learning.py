"""Margins of tests/test_learning.py over other seeds: the same pipeline (transformers SFT until the held-out
sampled reward first reaches START_REWARD, then single-process PPO quickstarts with the rule-based reward,
held-out sampled reward before and after), for several SFT seeds (the data order, hence when the model
starts to add) and PPO seeds; optionally the reward model from the SFT actor for several RW seeds.

    .venv/bin/python bench/bench_ppo_learning.py [--sft-seeds 0,1,2] [--ppo-seeds 1,2,3] [--rw-seeds 1]
        [--out /tmp/ppo_learning]

The test uses SFT seed 0 and PPO seeds 1, 2, 3. PPO seeds of one SFT run go three at a time.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reallm.apps.quickstart import run  # noqa: E402
from reallm.assets import make_tiny_assets  # noqa: E402
from tests import test_learning as T  # noqa: E402


def ppo_gains(sft: "T.AdditionSFT", assets, out: str, seeds) -> dict:
    start, step, selected = sft.ppo_start()
    prompts = T.valid_prompts(assets)
    before = T.sampled_reward(start, prompts, T.EVAL_SAMPLES, seed=2)
    train = os.path.join(out, "prompts.jsonl")
    with open(assets["ppo_train"]) as f, open(train, "w") as g:
        g.writelines(f.readlines()[:T.PPO_PROMPTS])
    gains, t0 = {}, time.perf_counter()
    for i in range(0, len(seeds), 3):
        trials = T.run_ppo_seeds(start, train, out, seeds[i:i + 3])
        for seed, d in trials.items():
            steps = T.PPO_EPOCHS * (T.PPO_PROMPTS // T.PPO_BATCH)
            after = T.sampled_reward(os.path.join(d, "checkpoints", "actor", f"step{steps}"), prompts,
                                     T.EVAL_SAMPLES, seed=2)
            gains[seed] = after - before
    return {"start_step": step, "selection_reward": selected, "before": before, "gains": gains,
            "mean_gain": sum(gains.values()) / len(gains), "ppo_wall_s": time.perf_counter() - t0,
            "sft_train_s": sft.train_s}


def rw_accuracy(sft: "T.AdditionSFT", assets, out: str, seed: int) -> list:
    start = sft.at(max(T.RW_SFT_STEPS, sft.step))
    assert run("rw", [f"model.path={start}", f"dataset.train_path={assets['rw_full_train']}",
                      f"dataset.valid_path={assets['rw_valid']}", "allocation_mode=d2p1m1", "n_gpus_per_node=2",
                      "cluster=cpu", "dataset.max_seqlen=32", "dataset.train_bs_n_seqs=64", "total_train_epochs=10",
                      "eval_freq_epochs=1", "model.gradient_checkpointing=False", "model.optimizer.lr=5e-4",
                      "model.optimizer.lr_scheduler_type=constant", "model.optimizer.weight_decay=0.0",
                      f"seed={seed}", f"output_dir={out}", "experiment_name=rw", f"trial_name=seed{seed}"],
               quiet=True) == 0
    rows = [json.loads(x) for x in open(os.path.join(out, "rw", f"seed{seed}", "metrics.jsonl"))]
    return [(r["step"], round(r["valid_accuracy"], 3)) for r in rows if "valid_accuracy" in r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-seeds", default="0,1,2")
    ap.add_argument("--ppo-seeds", default="1,2,3")
    ap.add_argument("--rw-seeds", default="", help="also train reward models (about 2 min each on 2 CPU cores)")
    ap.add_argument("--out", default="/tmp/ppo_learning")
    args = ap.parse_args()
    assets = make_tiny_assets(os.path.join(args.out, "assets"))
    ppo_seeds = [int(s) for s in args.ppo_seeds.split(",") if s]
    rw_seeds = [int(s) for s in args.rw_seeds.split(",") if s]
    for sft_seed in (int(s) for s in args.sft_seeds.split(",")):
        out = os.path.join(args.out, f"sft{sft_seed}")
        os.makedirs(out, exist_ok=True)
        sft = T.AdditionSFT(assets, os.path.join(out, "sft"), seed=sft_seed)
        if ppo_seeds:
            r = ppo_gains(sft, assets, out, ppo_seeds)
            print(f"SFT seed {sft_seed}: PPO start step {r['start_step']} (selection reward "
                  f"{r['selection_reward']:.3f}, held-out {r['before']:.3f}); gains "
                  + ", ".join(f"seed {s} {g:+.3f}" for s, g in r["gains"].items())
                  + f"; mean {r['mean_gain']:+.3f}; PPO wall {r['ppo_wall_s']:.0f}s, SFT {r['sft_train_s']:.0f}s",
                  flush=True)
        for seed in rw_seeds:
            t0 = time.perf_counter()
            acc = rw_accuracy(sft, assets, out, seed)
            print(f"SFT seed {sft_seed}, RW seed {seed}: held-out near-miss accuracy by step {acc} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
