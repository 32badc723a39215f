"""``make demo``: the main job on the embedded tiny default.

SFT → PPO on the tiny addition task, each stage through the quickstart with its own placements on 8 CPU
processes (``configs/tiny/{sft,ppo}.yaml``). PPO is rewarded by the task's checkable rule (``ppo.reward_fn``:
1 for the right sum, partial credit for close digits): a reward model that checks sums needs ~1500 steps of
near-miss pairs on a model that already adds (``tests/test_learning.py``), too long for a demo; one short
epoch of it stays at chance and PPO learns to please the noise (``configs/tiny/rw.yaml`` is that stage, for
reference). Prints where the checkpoints and metrics are, the addition accuracy (greedy, held-out prompts)
of the starting, SFT and PPO models, and writes ``reward_curve.png``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from reallm.errors import UserError

OUT = "outputs/demo"
EVAL_PROMPTS = 200


def ckpt(exp: str, role: str) -> str:
    from reallm.algorithms.recovery import latest_checkpoint

    return latest_checkpoint(os.path.join(OUT, f"tiny-{exp}", "demo", "checkpoints", role))


def accuracy(model_path: str, valid_path: str, tag: str) -> tuple[float, float]:
    """(exact-match accuracy, mean rule-based reward) of greedy answers to held-out prompts."""
    from reallm.apps.quickstart import run
    from reallm.assets.addition import reward

    prompts = os.path.join(OUT, "eval_prompts.jsonl")
    with open(valid_path) as f, open(prompts, "w") as g:
        for line in f.readlines()[:EVAL_PROMPTS]:
            g.write(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n")
    rc = run("gen", [f"model.path={model_path}", f"dataset.path={prompts}", f"output_dir={OUT}",
                     "experiment_name=eval", f"trial_name={tag}"], config="configs/tiny/gen.yaml", quiet=True)
    if rc != 0:
        raise SystemExit(rc)
    rows = [json.loads(x) for x in open(os.path.join(OUT, "eval", tag, "generated.jsonl"))]
    scores = [reward(r["prompt"], r["output"]) for r in rows]
    return sum(s == 1.0 for s in scores) / len(scores), sum(scores) / len(scores)


def plot(png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(exp, key):
        path = os.path.join(OUT, f"tiny-{exp}", "demo", "metrics.jsonl")
        rows = [json.loads(x) for x in open(path)]
        return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    for a, (exp, key, title) in zip(ax, [("sft", "loss", "SFT loss"),
                                         ("ppo", "reward", "PPO reward (sampled answers, rule)")]):
        x, y = series(exp, key)
        a.plot(x, y, lw=0.8, alpha=0.5)
        k = max(1, len(y) // 20)
        if len(y) >= k:
            smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
            a.plot(x, smooth, lw=2)
        a.set_title(title)
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    from reallm.apps.quickstart import run
    from reallm.assets import make_tiny_assets

    t0 = time.time()
    print("== reallm demo: SFT → PPO on the tiny addition task, 8 CPU processes ==", flush=True)
    paths = make_tiny_assets("assets")
    print(f"assets: tokenizer, checkpoints and data under {paths['root']}")
    os.makedirs(OUT, exist_ok=True)
    try:
        before = accuracy(paths["llama"], paths["ppo_valid"], "start")
        stages = [("sft", []), ("ppo", ["actor.path={sft}", "ref.path={sft}", "critic.path={sft}"])]
        done = {}
        for exp, over in stages:
            print(f"\n== {exp}: configs/tiny/{exp}.yaml ==", flush=True)
            args = [o.format(**done) for o in over] + [f"output_dir={OUT}"]
            rc = run(exp, args, config=f"configs/tiny/{exp}.yaml")
            if rc != 0:
                return rc
            done[exp] = ckpt(exp, {"sft": "default", "ppo": "actor"}[exp])
        after_sft = accuracy(done["sft"], paths["ppo_valid"], "sft")
        after_ppo = accuracy(done["ppo"], paths["ppo_valid"], "ppo")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    png = os.path.join(OUT, "reward_curve.png")
    plot(png)
    print(f"\n== done in {time.time() - t0:.0f} s ==")
    print(f"checkpoints: {done['sft']}  {done['ppo']}")
    print(f"metrics:     {OUT}/tiny-{{sft,ppo}}/demo/metrics.jsonl   plot: {png}")
    print(f"addition accuracy on {EVAL_PROMPTS} held-out prompts (greedy; exact / mean rule reward):")
    for name, (acc, rew) in (("start", before), ("after SFT", after_sft), ("after PPO", after_ppo)):
        print(f"  {name:10s} {acc:6.1%}  {rew:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
