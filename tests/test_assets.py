"""Tests of the tiny offline assets: tokenizer, random checkpoints, addition datasets, reward, determinism."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup would hang; everything here is local

from reallm.assets import addition_reward, make_tiny_assets  # noqa: E402
from reallm.assets.addition import DATASET_FILES, NEAR_MISS_OFFSETS, NUM_PAIRS, answer_for, parse_prompt  # noqa: E402
from reallm.assets.build import ASSETS_VERSION, is_complete, read_stamp  # noqa: E402
from reallm.assets.checkpoints import TINY_MODELS  # noqa: E402
from reallm.errors import UserError  # noqa: E402

CKPTS = [m.name for m in TINY_MODELS]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    return make_tiny_assets(str(tmp_path_factory.mktemp("tiny") / "assets"), seed=1)


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["tokenizer"])


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- tokenizer -------------------------------------------------------------------------------------------------

def test_tokenizer_special_tokens(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 384
    for name, tid, text in [("unk", 0, "<unk>"), ("bos", 1, "<s>"), ("eos", 2, "</s>"), ("pad", 3, "<pad>")]:
        assert (getattr(tokenizer, f"{name}_token_id"), getattr(tokenizer, f"{name}_token")) == (tid, text)
    ids = tokenizer("17+25=").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids  # BOS added, no EOS
    assert tokenizer("17+25=", add_special_tokens=False).input_ids == ids[1:]
    # Not a degenerate byte tokenizer: English words merge.
    assert len(tokenizer(" the answer", add_special_tokens=False).input_ids) <= 2


def test_tokenizer_round_trips(tokenizer, assets):
    texts = [r["prompt"] for r in _rows(assets["sft_valid"])] + [r["answer"] for r in _rows(assets["sft_valid"])]
    texts += ["What is 17 plus 25? The answer is 42.", "  spaces\tand\nnewlines ", "Ünïcödé → 数字 🙂", ""]
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == t
        assert tokenizer.decode(tokenizer(t).input_ids, skip_special_tokens=True) == t


def test_prompt_answer_tokenise_as_concatenation(tokenizer, assets):
    # Training code tokenises prompt and answer separately; that must equal tokenising the joined text.
    digit_ids = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    for r in _rows(assets["sft_valid"]):
        p = tokenizer(r["prompt"]).input_ids
        a = tokenizer(r["answer"], add_special_tokens=False).input_ids
        assert tokenizer(r["prompt"] + r["answer"]).input_ids == p + a
        assert len(a) == len(r["answer"]) and set(a) <= digit_ids  # one token per digit


# -- checkpoints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CKPTS)
def test_checkpoint_loads_and_runs(assets, tokenizer, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = assets[name]
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.get_vocab() == tokenizer.get_vocab()
    cfg = model.config
    assert cfg.vocab_size == len(tok) and model.dtype == torch.float32
    with open(os.path.join(d, "generation_config.json")) as f:
        gen = json.load(f)
    for key, tid in [("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                     ("pad_token_id", tok.pad_token_id)]:
        assert getattr(cfg, key) == gen[key] == tid, key
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    batch = tok(["17+25=", "3+4="], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 0.3  # non-degenerate: clearly preferred tokens, not near-uniform

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "llama_tied") == cfg.tie_word_embeddings
    q_bias = model.model.layers[0].self_attn.q_proj.bias
    assert (q_bias is not None) == (name == "qwen2")
    if q_bias is not None:
        assert q_bias.abs().max() > 0  # random, so a dropped bias shows up numerically
    assert (model.model.norm.weight != 1).any()


def test_checkpoint_shapes(assets):
    from reallm.spec import load_hf_config, spec_from_hf_config

    specs = {n: spec_from_hf_config(load_hf_config(assets[n]), assets[n]) for n in CKPTS}
    assert {n: s.family for n, s in specs.items()} == {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral",
                                                       "llama_tied": "llama", "llama_9h": "llama"}
    assert specs["qwen2"].qkv_bias and not specs["qwen2"].tie_word_embeddings
    s9 = specs["llama_9h"]
    assert (s9.num_heads, s9.num_kv_heads, s9.head_dim) == (9, 3, 8)
    assert s9.intermediate_size % 3 == 0 and s9.vocab_size % 3 == 0
    assert all(1e5 <= s.num_params <= 5e5 for s in specs.values())


# -- datasets and reward ---------------------------------------------------------------------------------------

def test_datasets(assets):
    data = {n: _rows(assets[n]) for n in DATASET_FILES}
    with open(assets["sft_train_json"], encoding="utf-8") as f:
        assert json.load(f) == data["sft_train"]
    for name, rows in data.items():
        assert rows, name
        prompts = [r["prompt"] for r in rows]
        assert len(set(prompts)) == len(prompts), f"{name} repeats prompts"
        for r in rows:
            parse_prompt(r["prompt"])
            assert r["prompt"].endswith("=")
    train = {r["prompt"] for n in DATASET_FILES if n.endswith("_train") for r in data[n]}
    valid = {r["prompt"] for n in DATASET_FILES if n.endswith("_valid") for r in data[n]}
    assert not train & valid
    for r in data["sft_train"] + data["sft_valid"]:
        assert set(r) == {"prompt", "answer"} and r["answer"] == answer_for(r["prompt"])
    for r in data["rw_train"] + data["rw_valid"]:
        assert set(r) == {"prompt", "pos_answers", "neg_answers"}
        ans = int(answer_for(r["prompt"]))
        assert r["pos_answers"] == [str(ans)] * NUM_PAIRS and len(r["neg_answers"]) == NUM_PAIRS
        negs = [int(n) for n in r["neg_answers"]]
        assert len(set(negs)) == NUM_PAIRS and all(n >= 0 and n - ans in NEAR_MISS_OFFSETS for n in negs)
    for r in data["ppo_train"] + data["ppo_valid"]:
        assert set(r) == {"prompt"}


def test_datasets_pass_the_experiment_reader(assets):
    from reallm.datasets import read_records

    schema = {"sft": "prompt_answer", "rw": "paired", "ppo": "prompt"}
    for name in [*DATASET_FILES, "sft_train_json"]:
        assert read_records(assets[name], schema[name.split("_")[0]], name)


@pytest.mark.parametrize("completion,expected", [
    ("42", 1.0), (" 42</s>", 1.0), ("42<pad><pad>", 1.0), ("042", 1.0), ("42 and more text", 1.0),
    ("41", 0.25), ("52", 0.25), ("4", 0.0), ("24", 0.0), ("142", 1 / 3),
    ("", 0.0), ("abc", 0.0), ("-42", 0.0), ("</s>", 0.0), ("forty-two", 0.0),
])
def test_reward(completion, expected):
    assert addition_reward("17+25=", completion) == pytest.approx(expected)


def test_reward_edges():
    assert addition_reward("<s>17+25=", "42") == 1.0  # prompt decoded with its BOS
    assert addition_reward("0+0=", "0") == 1.0 and addition_reward("0+0=", "00") == 1.0
    assert addition_reward("17+25=", "41", partial=False) == 0.0
    assert 0.0 <= addition_reward("17+25=", "9" * 10_000) < 0.5  # no int-parsing limit, still wrong
    with pytest.raises(ValueError):
        addition_reward("hello", "42")
    mod, _, attr = "reallm.assets.addition:reward".partition(":")
    assert getattr(importlib.import_module(mod), attr) is addition_reward


# -- build behaviour -------------------------------------------------------------------------------------------

def test_import_does_not_load_torch():
    code = ("import sys, reallm.assets; bad = [m for m in ('torch', 'transformers', 'tokenizers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_determinism_and_idempotency(assets, tmp_path):
    from safetensors.torch import load_file

    other = make_tiny_assets(str(tmp_path / "again"), seed=1)
    a, b = read_stamp(assets["root"]), read_stamp(other["root"])
    assert a["version"] == ASSETS_VERSION and a["files"] == b["files"]  # every file byte-identical (sha256)
    for name in DATASET_FILES:
        with open(assets[name], "rb") as f1, open(other[name], "rb") as f2:
            assert f1.read() == f2.read(), name
    for name in CKPTS:
        w1 = load_file(os.path.join(assets[name], "model.safetensors"))
        w2 = load_file(os.path.join(other[name], "model.safetensors"))
        assert w1.keys() == w2.keys() and all(w1[k].equal(w2[k]) for k in w1), name

    # Complete → reused untouched; a missing file → rebuilt to the same bytes.
    weights = os.path.join(other["llama"], "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert make_tiny_assets(other["root"], seed=1) == other and os.stat(weights).st_mtime_ns == mtime
    os.remove(os.path.join(other["qwen2"], "config.json"))
    assert not is_complete(other["root"], seed=1)
    make_tiny_assets(other["root"], seed=1)
    assert read_stamp(other["root"])["files"] == a["files"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind


def test_other_seed_changes_weights_and_data_not_tokenizer(assets, tmp_path):
    other = make_tiny_assets(str(tmp_path / "seed2"), seed=2)
    a, b = read_stamp(assets["root"])["files"], read_stamp(other["root"])["files"]
    assert a["tokenizer/tokenizer.json"] == b["tokenizer/tokenizer.json"]
    assert a["checkpoints/llama/model.safetensors"] != b["checkpoints/llama/model.safetensors"]
    assert a["data/sft_valid.jsonl"] != b["data/sft_valid.jsonl"]


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError):
        make_tiny_assets(str(tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli(tmp_path, assets):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "reallm.assets", assets["root"]], check=True, cwd=REPO,
                         capture_output=True, text=True, env=env).stdout
    assert "reused" in out and assets["llama_9h"] in out and assets["sft_train"] in out
