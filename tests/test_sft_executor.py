"""SFT through the quickstart on CPU processes: it learns, writes metrics and HF checkpoints, and data
parallelism updates the weights exactly as one process does."""

import json
import os

import torch

from reallm.apps.quickstart import run


def sft(tmp_path, assets, trial, mode, n, *extra):
    rc = run("sft", [f"model.path={assets['llama']}", f"dataset.train_path={assets['sft_train']}",
                     f"dataset.valid_path={assets['sft_valid']}", f"allocation_mode={mode}", f"n_gpus_per_node={n}",
                     "cluster=cpu", "dataset.max_seqlen=32", "model.gradient_checkpointing=False",
                     "model.optimizer.lr=3e-3", "model.optimizer.weight_decay=0.0", f"output_dir={tmp_path}",
                     f"trial_name={trial}", "experiment_name=sft", *extra])
    assert rc == 0
    return os.path.join(tmp_path, "sft", trial)


def load_ckpt(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def test_dp_update_equals_single_process(tmp_path, tiny_assets):
    common = ("dataset.train_bs_n_seqs=24", "total_train_epochs=1", "save_freq_steps=3", "eval_freq_epochs=null")
    one = sft(tmp_path, tiny_assets, "d1", "d1p1m1", 1, *common)
    three = sft(tmp_path, tiny_assets, "d3", "d3p1m1", 3, *common)
    a, b = load_ckpt(f"{one}/checkpoints/default/step3"), load_ckpt(f"{three}/checkpoints/default/step3")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    start = load_ckpt(tiny_assets["llama"])
    assert any((a[k] - start[k]).abs().max() > 1e-3 for k in a)  # it did train


def test_sft_learns_and_writes_outputs(tmp_path, tiny_assets):
    d = sft(tmp_path, tiny_assets, "learn", "d2p1m1", 2, "dataset.train_bs_n_seqs=64", "total_train_epochs=1",
            "dataset.valid_bs_n_seqs=500")
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["valid_loss"] < 0.5 * rows[0]["loss"]
    events = os.listdir(os.path.join(d, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    ckpts = os.listdir(os.path.join(d, "checkpoints", "default"))
    assert ckpts == [f"step{len(rows)}"]
    # judged by transformers alone: lower answer loss on held-out data than the starting model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["llama"])
    valid = [json.loads(x) for x in open(tiny_assets["sft_valid"])][:64]

    def answer_nll(path):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tot, n = 0.0, 0
        for r in valid:
            p = tok(r["prompt"]).input_ids
            a = tok(r["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids = torch.tensor([p + a])
            with torch.no_grad():
                lp = m(ids).logits[0, :-1].log_softmax(-1)
            tgt = ids[0, 1:]
            tot -= lp[len(p) - 1:, :].gather(1, tgt[len(p) - 1:, None]).sum().item()
            n += len(a)
        return tot / n

    assert answer_nll(os.path.join(d, "checkpoints", "default", ckpts[0])) < 0.5 * answer_nll(tiny_assets["llama"])
