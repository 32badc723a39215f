"""HF checkpoints in and out: what we save, transformers loads (actor and critic); slices load as asked."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from reallm.errors import UserError
from reallm.layout.params import param_table
from reallm.layout.shards import shards_of
from reallm.layout.stages import partition_stages
from reallm.model import (
    CheckpointReader,
    StageSpec,
    Transformer,
    load_hf_model,
    load_hf_weights,
    pack_sequences,
    read_hf_model,
    save_hf_model,
)
from reallm.model.hf_io import hf_tensors, save_hf_checkpoint
from reallm.placement import Placement

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """The tiny checkpoints: the shared conftest fixture when there is one, else built here."""
    try:
        return request.getfixturevalue("tiny_assets")
    except pytest.FixtureLookupError:
        from reallm.assets import make_tiny_assets

        return make_tiny_assets(str(tmp_path_factory.getbasetemp() / "tiny_assets"))


def _batch(vocab: int, lengths=(6, 11, 2), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return seqs, *pack_sequences(seqs)


@pytest.mark.parametrize("name,shard_bytes", [("llama_tied", 10**9), ("qwen2", 60_000), ("mistral", 10**9)])
def test_saved_actor_loads_in_transformers_with_the_same_logits(tiny, tmp_path, name, shard_bytes):
    model = load_hf_model(tiny[name]).eval()
    out = str(tmp_path / "actor")
    save_hf_model(model, out, source_path=tiny[name], max_shard_bytes=shard_bytes)
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= files
    assert ("model.safetensors.index.json" in files) == (shard_bytes < 10**9)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__.endswith("ForCausalLM")
    seqs, tokens, cu = _batch(model.spec.vocab_size)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
        torch.testing.assert_close(model(tokens, cu), ref, atol=1e-4, rtol=0)
    if model.spec.tie_word_embeddings:
        reader = CheckpointReader(out)
        assert not reader.has("lm_head.weight")
    # And back through our own loader, bit for bit.
    again = load_hf_model(out)
    for (n, p), (n2, q) in zip(model.hf_named_parameters(), again.hf_named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, q)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("1+1=")["input_ids"] == transformers.AutoTokenizer.from_pretrained(tiny[name])("1+1=")["input_ids"]


def test_critic_from_causal_lm_is_seeded_saved_and_loaded_by_transformers(tiny, tmp_path, caplog):
    path = tiny["llama"]
    with caplog.at_level(logging.INFO, logger="reallm.model.hf_io"):
        critic = load_hf_model(path, is_critic=True, critic_init_seed=7).eval()
    assert sum("initialised score.weight" in r.getMessage() for r in caplog.records) == 1
    same = load_hf_model(path, is_critic=True, critic_init_seed=7)
    other = load_hf_model(path, is_critic=True, critic_init_seed=8)
    assert torch.equal(critic.score.weight, same.score.weight)
    assert not torch.equal(critic.score.weight, other.score.weight)
    assert torch.count_nonzero(critic.score.bias) == 0

    out = str(tmp_path / "critic")
    save_hf_model(critic, out, source_path=path)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForTokenClassification"] and cfg["num_labels"] == 1
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
    seqs, tokens, cu = _batch(critic.spec.vocab_size, seed=1)
    with torch.no_grad():
        values = critic(tokens, cu)
        ref = torch.cat([hf(torch.tensor([s])).logits[0, :, 0] for s in seqs])
    assert values.shape == (tokens.shape[0],)
    torch.testing.assert_close(values, ref, atol=1e-5, rtol=0)
    # A saved critic reloads with its own head: no initialisation message this time.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reallm.model.hf_io"):
        reloaded = load_hf_model(out, is_critic=True)
    assert not caplog.records
    assert torch.equal(reloaded.score.weight, critic.score.weight)


def test_critic_checkpoint_loaded_as_actor_says_set_is_critic(tiny, tmp_path):
    critic = load_hf_model(tiny["qwen2"], is_critic=True)
    out = str(tmp_path / "critic")
    save_hf_model(critic, out)
    with pytest.raises(UserError, match="is_critic=True"):
        load_hf_model(out)


def test_slice_rule_reads_only_the_shard_including_vocab_padding(tmp_path):
    """Drive the loader with the layout's shards: tp=2 rank 1, vocabulary 63 padded to 64."""
    cfg = transformers.Qwen2Config(vocab_size=63, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = str(tmp_path / "qwen")
    hf.save_pretrained(path)
    full = {n: p.detach() for n, p in hf.named_parameters()}
    spec = read_hf_model(path).spec
    placement = Placement(devices=(0, 1, 2, 3), tp=2, pp=2)
    device = placement.device_at(pp=1, dp=0, tp=1)
    shards = shards_of(spec, placement, device).shards
    stage = StageSpec.from_partition(partition_stages(spec, 2), 1)
    model = Transformer(spec, stage)
    # Stand-in for reallm.parallel: give every parameter its local (shard) shape.
    local = {s.name: s for s in shards}
    for name, p in model.hf_named_parameters():
        p.data = torch.full(local[name].local_shape, float("nan"))
    asked = []

    def rule(name, shape):
        asked.append((name, shape))
        return local[name].full_slices

    load_hf_weights(model, path, slices=rule)
    assert sorted(n for n, _ in asked) == sorted(local)
    shapes = {p.name: p.shape for p in param_table(spec)}
    assert all(shape == shapes[n] for n, shape in asked)
    for name, p in model.hf_named_parameters():
        s = local[name]
        torch.testing.assert_close(p.data[s.local_slices], full[name][s.full_slices], atol=0, rtol=0)
        if name == "lm_head.weight":
            assert p.shape[0] == 32 and s.box[0] == (32, 63)
            assert torch.count_nonzero(p.data[31:]) == 0  # the padding row is zeroed
    # Same result from a mapping instead of a callable.
    model2 = Transformer(spec, stage)
    for name, p in model2.hf_named_parameters():
        p.data = torch.empty(local[name].local_shape)
    load_hf_weights(model2, path, slices={n: s.full_slices for n, s in local.items()})
    for (_n, p), (_, q) in zip(model.hf_named_parameters(), model2.hf_named_parameters(), strict=True):
        assert torch.equal(p, q)


def test_pytorch_bin_fallback_and_base_model_names(tiny, tmp_path):
    src = load_hf_model(tiny["llama"])
    state = {n: p.detach().clone() for n, p in src.hf_named_parameters()}
    path = tmp_path / "bin"
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(open(os.path.join(tiny["llama"], "config.json")).read())
    model = load_hf_model(str(path))
    for (n, p), (_, q) in zip(model.hf_named_parameters(), src.hf_named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # A sharded bin with an index, and names without the "model." prefix (a base LlamaModel checkpoint).
    path2 = tmp_path / "bin2"
    path2.mkdir()
    names = list(state)
    a, b = names[: len(names) // 2], names[len(names) // 2:]
    strip = lambda n: n[len("model."):] if n.startswith("model.") else n  # noqa: E731
    torch.save({strip(n): state[n] for n in a}, path2 / "pytorch_model-00001-of-00002.bin")
    torch.save({strip(n): state[n] for n in b}, path2 / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {**{strip(n): "pytorch_model-00001-of-00002.bin" for n in a},
                            **{strip(n): "pytorch_model-00002-of-00002.bin" for n in b}}}
    (path2 / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (path2 / "config.json").write_text((path / "config.json").read_text())
    model2 = load_hf_model(str(path2))
    for (n, p), (_, q) in zip(model2.hf_named_parameters(), src.hf_named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_pipeline_stages_save_one_checkpoint(tiny, tmp_path):
    info = read_hf_model(tiny["llama_tied"])
    part = partition_stages(info.spec, 2)
    stages = [load_hf_model(tiny["llama_tied"], stage=StageSpec.from_partition(part, s)) for s in range(2)]
    out = str(tmp_path / "pp")
    save_hf_checkpoint(out, info.spec, hf_tensors(stages), arch=info.arch, source_path=tiny["llama_tied"])
    whole = load_hf_model(out)
    ref = load_hf_model(tiny["llama_tied"])
    for (n, p), (_, q) in zip(whole.hf_named_parameters(), ref.hf_named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="missing"):
        save_hf_checkpoint(out, info.spec, dict(stages[0].hf_named_parameters()))


def test_llama3_rope_survives_save(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 512})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "src"))
    model = load_hf_model(str(tmp_path / "src")).eval()
    save_hf_model(model, str(tmp_path / "dst"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst")).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    seqs, tokens, cu = _batch(64, lengths=(50, 3))
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
        torch.testing.assert_close(model(tokens, cu), ref, atol=1e-4, rtol=0)


def test_reward_model_from_sequence_classification_gets_a_zero_bias(tmp_path, caplog):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg)
    hf.save_pretrained(str(tmp_path / "rw"))
    with caplog.at_level(logging.INFO, logger="reallm.model.hf_io"):
        critic = load_hf_model(str(tmp_path / "rw"), is_critic=True).eval()
    assert any("no score.bias" in r.getMessage() for r in caplog.records)
    assert torch.equal(critic.score.weight, hf.score.weight) and torch.count_nonzero(critic.score.bias) == 0
    seqs, tokens, cu = _batch(64, lengths=(5, 8))
    with torch.no_grad():
        hidden = torch.cat([hf.model(torch.tensor([s])).last_hidden_state[0] for s in seqs])
        torch.testing.assert_close(critic(tokens, cu), hf.score(hidden)[:, 0], atol=1e-5, rtol=0)


def test_empty_model_is_tied_and_fully_loaded(tiny):
    model = load_hf_model(tiny["llama_tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
