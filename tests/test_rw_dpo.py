"""Reward modeling and DPO through the quickstart on CPU processes: pairs stay whole when the executor
splits a batch; dp, tp (sequence parallel) and pp layouts update the weights exactly as one process does;
the reward model learns a held-out preference; DPO (ref_inf and actor_train on different placements)
raises the held-out chosen-minus-rejected log-prob margin and resumes exactly after a failure. The
held-out figures are re-computed with transformers alone from the saved checkpoints."""

import json
import math
import os
import random

import pytest
import torch

from executor.data import split_balanced
from reallm.apps.quickstart import run


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_rows(path, n=None):
    with open(path) as f:
        rows = [json.loads(x) for x in f]
    return rows[:n] if n else rows


def metrics(d):
    return [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]


def load_ckpt(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def quickstart(exp, tmp_path, trial, *overrides):
    rc = run(exp, ["cluster=cpu", "dataset.max_seqlen=32", f"output_dir={tmp_path}", f"experiment_name={exp}",
                   f"trial_name={trial}", *overrides], quiet=True)
    assert rc == 0
    return os.path.join(tmp_path, exp, trial)


def padded(seqs):
    """Right-padded ids and attention mask: transformers' outputs at real positions equal unpadded ones."""
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    return ids, (torch.arange(n)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()


def pair_texts(tok, rows):
    """(prompt ids, chosen answer ids, rejected answer ids) of every pair; answers end with EOS."""
    enc = lambda a: tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]  # noqa: E731
    return [(tok(r["prompt"]).input_ids, enc(c), enc(x)) for r in rows for c, x in zip(r["pos_answers"], r["neg_answers"])]


@pytest.fixture(scope="session")
def sft_start(tiny_assets, tmp_path_factory):
    """The tiny llama fine-tuned on the addition SFT data until it adds (~95% held-out pairwise accuracy of
    its own log-probs): the start DPO needs to improve on held-out pairs. Trained with transformers on padded
    batches, so it is an independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend with the other tests' workers
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_assets["llama"])
    data = []
    for r in read_rows(tiny_assets["sft_train"]):
        p = tok(r["prompt"]).input_ids
        a = tok(r["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        data.append((p + a, [-100] * len(p) + a))
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    rng = random.Random(0)
    for _ in range(700):
        batch = rng.sample(data, 64)
        n = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [0] * (n - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in batch])
        mask = (torch.arange(n)[None, :] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    torch.set_num_threads(threads)
    out = str(tmp_path_factory.mktemp("sft_start"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- pure logic ---------------------------------------------------------------------------------------------
def test_split_keeps_groups_whole():
    ids = list(range(20))
    tokens = [1 + (i * 7) % 5 for i in ids]
    for parts in (1, 2, 3, 4):
        for k in (1, 2, 4):
            split = split_balanced(ids, tokens, parts, min_per_part=1, group_size=k)
            assert [i for p in split for i in p] == ids
            assert all(len(p) % k == 0 and len(p) >= k for p in split)
    assert all(len(p) >= 4 for p in split_balanced(ids, tokens, 3, 3, group_size=2))  # 3 seqs → 2 pairs
    with pytest.raises(ValueError):
        split_balanced(list(range(5)), [1] * 5, 2, group_size=2)


# -- reward modeling ------------------------------------------------------------------------------------------
def uneven_pairs(rows):
    """Entries with 1, 2 and 3 pairs (3 > max_pairs_per_prompt = 2: two are sampled per epoch)."""
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if i % 3 == 0:
            r["pos_answers"], r["neg_answers"] = r["pos_answers"][:1], r["neg_answers"][:1]
        elif i % 3 == 1:
            wrong = str(int(r["pos_answers"][0]) + 3)
            r["pos_answers"], r["neg_answers"] = r["pos_answers"] + r["pos_answers"][:1], r["neg_answers"] + [wrong]
        out.append(r)
    return out


def assert_same_update(runs, sub, steps):
    """Every run's checkpoint after ``steps`` and per-step loss equal the first run's."""
    ref = load_ckpt(f"{runs[0]}/checkpoints/{sub}/step{steps}")
    ref_rows = metrics(runs[0])
    assert [r["step"] for r in ref_rows] == list(range(1, steps + 1))
    for d in runs[1:]:
        got = load_ckpt(f"{d}/checkpoints/{sub}/step{steps}")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
        for r0, r in zip(ref_rows, metrics(d), strict=True):
            assert r["num_pairs"] == r0["num_pairs"]
            assert r["loss"] == pytest.approx(r0["loss"], abs=1e-5)
    return ref


def test_rw_update_same_under_dp_and_model_parallel_layouts(tmp_path, tiny_assets):
    train = write_jsonl(tmp_path / "train.jsonl", uneven_pairs(read_rows(tiny_assets["rw_train"], 96)))
    common = (f"model.path={tiny_assets['llama']}", f"dataset.train_path={train}", "dataset.train_bs_n_seqs=32",
              "total_train_epochs=1", "eval_freq_epochs=null", "model.gradient_checkpointing=False",
              "model.optimizer.lr=3e-3", "model.optimizer.weight_decay=0.0", "allocation_mode=manual")
    one = quickstart("rw", tmp_path, "d1", *common, "n_gpus_per_node=1")
    two = quickstart("rw", tmp_path, "d2", *common, "n_gpus_per_node=2", "allocation.parallel.data_parallel_size=2",
                     "allocation.n_mbs=2")
    four = quickstart("rw", tmp_path, "p2m2", *common, "n_gpus_per_node=4",
                      "allocation.parallel.model_parallel_size=2", "allocation.parallel.pipeline_parallel_size=2",
                      "allocation.parallel.use_sequence_parallel=True")
    final = assert_same_update([one, two, four], "default", 3)
    assert "score.weight" in final and "lm_head.weight" not in final
    start = load_ckpt(tiny_assets["llama"])
    assert any((final[k] - start[k]).abs().max() > 1e-3 for k in start if k in final)  # it did train


def truncated_pairs(rows):
    """A preference a tiny model learns in a few dozen steps: the whole sum over the sum missing its last
    digit. (The near-miss negatives of the assets need the critic to learn addition: about 1500 steps.)"""
    return [{"prompt": r["prompt"], "pos_answers": r["pos_answers"][:1],
             "neg_answers": [r["pos_answers"][0][:-1] if len(r["pos_answers"][0]) > 1 else r["neg_answers"][0]]}
            for r in rows]


def test_rw_learns_held_out_preference(tmp_path, tiny_assets):
    train = write_jsonl(tmp_path / "train.jsonl", truncated_pairs(read_rows(tiny_assets["rw_train"], 1024)))
    valid = write_jsonl(tmp_path / "valid.jsonl", truncated_pairs(read_rows(tiny_assets["rw_valid"])))
    d = quickstart("rw", tmp_path, "learn", f"model.path={tiny_assets['llama']}", f"dataset.train_path={train}",
                   f"dataset.valid_path={valid}", "dataset.train_bs_n_seqs=32", "total_train_epochs=1",
                   "allocation_mode=d2p1m1", "n_gpus_per_node=2", "model.gradient_checkpointing=False",
                   "model.optimizer.lr=1e-3", "model.optimizer.weight_decay=0.0")
    rows = metrics(d)
    assert [r["step"] for r in rows] == list(range(1, 33))
    assert all(r["num_pairs"] == 32 for r in rows)
    last = rows[-1]
    assert last["valid_accuracy"] >= 0.9 and last["valid_loss"] < 0.5 * rows[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.2)
    assert os.listdir(os.path.join(d, "checkpoints", "default")) == ["step32"]

    # judged by transformers alone: the saved *ForTokenClassification gives the same held-out figures
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    ckpt = os.path.join(d, "checkpoints", "default", "step32")
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForTokenClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    seqs = [p + a for p, c, x in pair_texts(tok, read_rows(valid)) for a in (c, x)]
    ids, mask = padded(seqs)
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(seqs)), mask.sum(1) - 1, 0]
    diff = scores[0::2] - scores[1::2]
    assert -torch.nn.functional.logsigmoid(diff).mean().item() == pytest.approx(last["valid_loss"], abs=1e-4)
    assert (diff > 0).float().mean().item() == pytest.approx(last["valid_accuracy"], abs=2e-3)


# -- DPO --------------------------------------------------------------------------------------------------
def test_dpo_update_same_on_one_process_and_mixed_placements(tmp_path, tiny_assets, sft_start):
    """ref_inf (pp=2 on devices 2-3) and actor_train (tp=2 with sequence parallelism, dp=2, on devices 0-3):
    vocab-parallel log-probs, the seqlogp transfer between layouts, pairs kept whole."""
    train = write_jsonl(tmp_path / "train.jsonl", uneven_pairs(read_rows(tiny_assets["rw_train"], 96)))
    common = (f"actor.path={sft_start}", f"ref.path={sft_start}", f"dataset.train_path={train}",
              "dataset.train_bs_n_seqs=32", "total_train_epochs=1", "eval_freq_epochs=null",
              "actor.gradient_checkpointing=False", "actor.optimizer.lr=3e-4", "actor.optimizer.weight_decay=0.0",
              "beta=0.5", "allocation_mode=manual")
    one = quickstart("dpo", tmp_path, "d1", *common, "n_gpus_per_node=1")
    mixed = quickstart("dpo", tmp_path, "mixed", *common, "n_gpus_per_node=4",
                       "actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
                       "actor_train.parallel.use_sequence_parallel=True", "ref_inf.device_mesh=[2,3]",
                       "ref_inf.parallel.pipeline_parallel_size=2")
    assert_same_update([one, mixed], "actor", 3)


def test_dpo_resume_equals_uninterrupted(tmp_path, tiny_assets, sft_start, monkeypatch):
    """A DPO job whose actor_train fails at step 3 (after recovery states at every step), resumed, ends with
    the weights of an uninterrupted run."""
    from reallm.algorithms import dpo

    train = write_jsonl(tmp_path / "train.jsonl", uneven_pairs(read_rows(tiny_assets["rw_train"], 96)))
    common = (f"actor.path={sft_start}", f"ref.path={sft_start}", f"dataset.train_path={train}",
              "dataset.train_bs_n_seqs=24", "total_train_epochs=1", "eval_freq_epochs=null",
              "actor.gradient_checkpointing=False", "actor.optimizer.lr=3e-4", "actor.optimizer.weight_decay=0.0",
              "beta=0.5", "allocation_mode=manual", "n_gpus_per_node=2", "ref_inf.device_mesh=[1]",
              "ref_inf.parallel.data_parallel_size=1", "actor_train.parallel.data_parallel_size=2")
    whole = quickstart("dpo", tmp_path, "whole", *common)

    actor_train = dpo.DPORuntime._actor_train

    def fail_at_step_3(self, ctx, batch):
        if ctx.step == 2:
            raise RuntimeError("injected failure")
        return actor_train(self, ctx, batch)

    monkeypatch.setattr(dpo.DPORuntime, "_actor_train", fail_at_step_3)  # forked workers inherit it
    args = ["cluster=cpu", "dataset.max_seqlen=32", f"output_dir={tmp_path}", "experiment_name=dpo",
            "trial_name=resumed", "save_freq_steps=1", *common]
    assert run("dpo", [*args, "recover_mode=save"], quiet=True) != 0
    monkeypatch.undo()
    assert run("dpo", [*args, "recover_mode=resume"], quiet=True) == 0
    resumed = os.path.join(tmp_path, "dpo", "resumed")
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    a, b = load_ckpt(f"{whole}/checkpoints/actor/step4"), load_ckpt(f"{resumed}/checkpoints/actor/step4")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def logp_margin(path, tok, rows):
    """Mean over pairs of Σ answer-token log-probs (chosen − rejected), with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = pair_texts(tok, rows)
    seqs = [p + a for p, c, x in texts for a in (c, x)]
    ids, mask = padded(seqs)
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    lp = lp.gather(2, ids[:, 1:, None])[..., 0]
    answer = torch.zeros_like(lp, dtype=torch.bool)  # row t scores token t+1
    for i, (p, c, x) in enumerate(t for t in texts for _ in range(2)):
        answer[i, len(p) - 1:len(p) - 1 + len(c if i % 2 == 0 else x)] = True
    s = torch.where(answer, lp, 0.0).sum(1)
    return (s[0::2] - s[1::2]).mean().item()


def test_dpo_raises_held_out_margin_on_separate_placements(tmp_path, tiny_assets, sft_start):
    train = write_jsonl(tmp_path / "train.jsonl", read_rows(tiny_assets["rw_train"], 512))
    d = quickstart("dpo", tmp_path, "dpo", f"actor.path={sft_start}", f"ref.path={sft_start}",
                   f"dataset.train_path={train}", f"dataset.valid_path={tiny_assets['rw_valid']}",
                   "dataset.train_bs_n_seqs=32", "total_train_epochs=1", "allocation_mode=manual",
                   "n_gpus_per_node=2", "ref_inf.device_mesh=[1]", "ref_inf.parallel.data_parallel_size=1",
                   "actor_train.device_mesh=[0,1]", "actor_train.parallel.data_parallel_size=2",
                   "actor.gradient_checkpointing=False", "actor.optimizer.lr=5e-4",
                   "actor.optimizer.lr_scheduler_type=constant", "actor.optimizer.weight_decay=0.0", "beta=0.1")
    placements = {c["name"]: c["placement"] for c in json.load(open(os.path.join(d, "plan.json")))["calls"]}
    assert (placements["ref_inf"]["devices"], placements["actor_train"]["devices"]) == ([1], [0, 1])
    rows = metrics(d)
    first, last = rows[0], rows[-1]
    assert [r["step"] for r in rows] == list(range(1, 17))
    # Step 1: the policy is the reference, so every margin is 0 iff ref_inf's log-probs reached actor_train
    # aligned with the right sequences (through the executor's transfer between the placements).
    assert abs(first["reward_margin"]) < 1e-5 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    gain = last["valid_logp_margin"] - first["ref_valid_logp_margin"]
    assert gain > 0.5 and last["valid_accuracy"] > 0.9
    assert last["valid_reward_margin"] == pytest.approx(0.1 * gain, rel=1e-6)
    assert last["loss"] < math.log(2) and last["reward_margin"] > 0
    ckpt = os.path.join(d, "checkpoints", "actor", "step16")
    assert os.listdir(os.path.join(d, "checkpoints", "actor")) == ["step16"]

    # judged by transformers alone, on the same held-out pairs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_start)
    held_out = read_rows(tiny_assets["rw_valid"])
    before, after = logp_margin(sft_start, tok, held_out), logp_margin(ckpt, tok, held_out)
    assert before == pytest.approx(first["ref_valid_logp_margin"], abs=1e-3)
    assert after == pytest.approx(last["valid_logp_margin"], abs=1e-3)
