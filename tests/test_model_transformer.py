"""The packed transformer equals transformers, per family, in logits (1e-4) and SFT-loss gradients (1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from reallm.errors import UserError
from reallm.layout.params import param_table
from reallm.layout.stages import partition_stages
from reallm.model import StageSpec, Transformer, load_hf_model, pack_sequences, read_hf_model, sft_loss, sft_micro_batch
from reallm.model.arch import RopeConfig, arch_from_hf_config, rope_from_hf_config
from reallm.model.attention import PackedSeqs
from reallm.model.transformer import _Ctx, packed_positions
from reallm.spec import ModelSpec

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

FAMILIES = ["llama", "qwen2", "mistral", "llama_tied"]
LENGTHS = (7, 19, 1, 12, 3)


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """The tiny checkpoints: the shared conftest fixture when there is one, else built here."""
    try:
        return request.getfixturevalue("tiny_assets")
    except pytest.FixtureLookupError:
        from reallm.assets import make_tiny_assets

        return make_tiny_assets(str(tmp_path_factory.getbasetemp() / "tiny_assets"))


def _random_seqs(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf(path: str, attn: str = "eager"):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(tiny, name):
    model = load_hf_model(tiny[name]).eval()
    hf = _hf(tiny[name], attn="sdpa")
    seqs = _random_seqs(model.spec.vocab_size)
    tokens, cu = pack_sequences(seqs)
    with torch.no_grad():
        ours = model(tokens, cu)
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
    assert ours.shape == (sum(LENGTHS), model.spec.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_loss_gradients_match_transformers(tiny, name):
    model = load_hf_model(tiny[name])
    hf = _hf(tiny[name])
    seqs = _random_seqs(model.spec.vocab_size, seed=1)
    prompt_lens = [3, 5, 1, 4, 2]
    mb = sft_micro_batch(seqs, prompt_lens)
    loss, stats = sft_loss(model(mb["tokens"], mb["cu_seqlens"]), mb)
    loss.backward()

    n = float(mb["num_answer_tokens_global"])
    ref = torch.zeros(())
    for s, pl in zip(seqs, prompt_lens, strict=True):
        if len(s) < 2:
            continue
        logits = hf(torch.tensor([s])).logits[0, :-1]
        answer = (torch.arange(1, len(s)) >= pl).float()  # target token index >= prompt length
        ref = ref + (F.cross_entropy(logits, torch.tensor(s[1:]), reduction="none") * answer).sum()
    (ref / n).backward()
    torch.testing.assert_close(loss, ref / n, atol=1e-5, rtol=0)
    assert stats["num_tokens"] == n
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    ours = dict(model.hf_named_parameters())
    assert set(ours) == set(hf_grads)
    for k, p in ours.items():
        torch.testing.assert_close(p.grad, hf_grads[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("critic", [False, True])
def test_parameter_names_equal_layout_table(family, tied, critic):
    spec = ModelSpec(family, num_layers=2, hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2,
                     head_dim=4, vocab_size=11, tie_word_embeddings=tied, qkv_bias=family == "qwen2", is_critic=critic)
    model = Transformer(spec)
    assert [(n, tuple(p.shape)) for n, p in model.hf_named_parameters()] == [(p.name, p.shape)
                                                                                for p in param_table(spec)]
    assert list(model.model.layers.keys()) == ["0", "1"]


@pytest.mark.parametrize("name,pp", [("llama", 2), ("llama_tied", 3), ("qwen2", 4)])
def test_pipeline_stages_compose_to_the_whole_model(tiny, name, pp):
    info = read_hf_model(tiny[name])
    partition = partition_stages(info.spec, pp)
    stages = [load_hf_model(tiny[name], stage=StageSpec.from_partition(partition, s)).eval() for s in range(pp)]
    whole = load_hf_model(tiny[name]).eval()
    tokens, cu = pack_sequences(_random_seqs(info.spec.vocab_size, seed=2))
    with torch.no_grad():
        x = tokens
        for st in stages:
            x = st(x, cu)
        torch.testing.assert_close(x, whole(tokens, cu), atol=0, rtol=0)
    # Each stage holds exactly its blocks; together they cover the table (the tied copy named as the embedding).
    names = [n for st in stages for n, _ in st.hf_named_parameters()]
    table = {p.name for p in param_table(info.spec)}
    assert set(names) == table
    last = stages[-1]
    assert last.model.embed_tokens is None and last.model.norm is not None
    assert last.lm_head_is_tied_copy == info.spec.tie_word_embeddings
    assert all(st.model.norm is None for st in stages[:-1])
    with pytest.raises(ValueError, match="hidden states"):
        stages[1](tokens, cu)


def test_gradient_checkpointing_gives_identical_gradients(tiny):
    seqs = _random_seqs(384, seed=3)
    mb = sft_micro_batch(seqs, [2, 2, 1, 2, 2])
    grads = []
    for ckpt in (False, True):
        model = load_hf_model(tiny["qwen2"])
        model.gradient_checkpointing = ckpt
        sft_loss(model(mb["tokens"], mb["cu_seqlens"]), mb)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.hf_named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=0, rtol=0)


def test_packed_positions_restart_per_sequence():
    seqs = PackedSeqs.from_cu_seqlens(torch.tensor([0, 3, 3, 5], dtype=torch.int32))
    idx, pos = packed_positions(seqs, "cpu")
    assert idx.tolist() == [0, 0, 0, 2, 2] and pos.tolist() == [0, 1, 2, 0, 1]
    assert seqs.max_seqlen == 3


def test_forward_rejects_mismatched_cu_seqlens(tiny):
    model = load_hf_model(tiny["llama"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.tensor([1, 2, 3]), torch.tensor([0, 2], dtype=torch.int32))


@pytest.mark.parametrize("tp", [2, 4])
def test_attention_shards_with_fewer_heads_sum_to_the_full_output(tp):
    """Head counts come from weight shapes: tp shards (q heads split, kv heads split or replicated) and a
    row-parallel o_proj sum to the full attention. num_kv_heads = 2, so tp = 4 replicates each kv head."""
    spec = ModelSpec("qwen2", num_layers=1, hidden_size=32, intermediate_size=24, num_heads=4, num_kv_heads=2,
                     head_dim=8, vocab_size=11, qkv_bias=True)
    full = Transformer(spec)
    full.init_weights(seed=5, std=0.2)
    attn = full.model.layers["0"].self_attn
    T = 9
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(0))
    seqs = PackedSeqs.from_cu_seqlens(torch.tensor([0, 4, 9], dtype=torch.int32))
    _, pos = packed_positions(seqs, "cpu")
    cos, sin = full._rope(pos, x.dtype)
    ctx = _Ctx(cos, sin, seqs=seqs)
    with torch.no_grad():
        ref = attn(x, ctx, 0)
        total = torch.zeros_like(ref)
        q_rows, kv_rows = 4 * 8 // tp, max(1, 2 // tp) * 8
        for r in range(tp):
            shard = Transformer(spec).model.layers["0"].self_attn
            kv_head = r * 2 // tp  # kv head of this rank's q heads
            qs = slice(r * q_rows, (r + 1) * q_rows)
            ks = slice(kv_head * 8, kv_head * 8 + kv_rows) if tp > 2 else slice(r * kv_rows, (r + 1) * kv_rows)
            for proj, rows in (("q_proj", qs), ("k_proj", ks), ("v_proj", ks)):
                src, dst = getattr(attn, proj), getattr(shard, proj)
                dst.weight = torch.nn.Parameter(src.weight[rows].clone())
                dst.bias = torch.nn.Parameter(src.bias[rows].clone())
            shard.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, qs].clone())
            total += shard(x, ctx, 0)
    torch.testing.assert_close(total, ref, atol=1e-5, rtol=0)


# -- rope scaling and sliding windows against transformers -----------------------------------------------


def _tiny_hf_checkpoint(tmp_path, family: str = "llama", **overrides) -> str:
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[family]
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kw.update(overrides)
    cfg = cls(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = str(tmp_path / f"{family}_ckpt")
    model.save_pretrained(path)
    return path


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    # head_dim 8 and theta 5e5: the 4 wavelengths are 6, 167, ~4.4e3, ~1.2e5; with L = 512 the llama3
    # cut-offs are 128 and 512, so one frequency is kept, one smoothed and two scaled: every branch is hit.
    path = _tiny_hf_checkpoint(tmp_path, rope_scaling=scaling, rope_theta=5e5, hidden_size=32, num_attention_heads=4)
    info = read_hf_model(path)
    assert info.arch.rope.rope_type == scaling["rope_type"]
    assert info.spec.rope_scaling["rope_type"] == scaling["rope_type"]  # fixed up from rope_parameters
    hf = _hf(path)
    model = load_hf_model(path).eval()
    seqs = _random_seqs(64, lengths=(40, 90, 5), seed=4)
    tokens, cu = pack_sequences(seqs)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
        torch.testing.assert_close(model(tokens, cu), ref, atol=1e-4, rtol=0)
    hf_inv = hf.model.rotary_emb.inv_freq
    torch.testing.assert_close(info.arch.rope.inv_freq(8), hf_inv, atol=0, rtol=0)


def test_rope_config_formats_and_unknown_types():
    legacy = {"rope_theta": 5e5, "rope_scaling": dict(LLAMA3_ROPE, type="llama3"), "max_position_embeddings": 128}
    new = {"rope_parameters": dict(LLAMA3_ROPE, rope_theta=5e5)}
    assert rope_from_hf_config(legacy) == rope_from_hf_config(new)
    assert rope_from_hf_config({"rope_theta": 1e6}) == RopeConfig(theta=1e6)
    with pytest.raises(UserError, match="yarn"):
        rope_from_hf_config({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UserError, match="dynamic"):
        rope_from_hf_config({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(UserError, match="hidden_act"):
        arch_from_hf_config({"num_hidden_layers": 1, "hidden_act": "gelu"})


def test_sliding_window_matches_transformers(tmp_path):
    path = _tiny_hf_checkpoint(tmp_path, "mistral", sliding_window=5)
    info = read_hf_model(path)
    assert info.arch.sliding_windows == (5, 5)
    model = load_hf_model(path).eval()
    hf = _hf(path, attn="sdpa")
    seqs = _random_seqs(64, lengths=(13, 4, 9), seed=5)
    tokens, cu = pack_sequences(seqs)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
        torch.testing.assert_close(model(tokens, cu), ref, atol=1e-4, rtol=0)
    with open(f"{path}/config.json") as f:
        assert json.load(f)["sliding_window"] == 5


def test_chunked_prefill_equals_one_forward():
    from reallm.model.transformer import Transformer, pack_sequences
    from reallm.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                     head_dim=16, vocab_size=100)
    m = Transformer(spec)
    m.init_weights(1)
    m.eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (5, 17, 3, 40, 9, 1)]
    tok, cu = pack_sequences(seqs)
    with torch.no_grad():
        whole = m.new_kv_cache(6, 50)
        want = m(tok, cu, kv_cache=whole, select_rows=(cu[1:] - 1).long())
        for max_tokens in (1, 20, 45, 10_000):  # one prompt per group (even a longer one), mixed, all at once
            cache = m.new_kv_cache(6, 50)
            torch.testing.assert_close(m.prefill(tok, cu, cache, max_tokens=max_tokens), want, atol=1e-5, rtol=1e-5)
            for layer in whole.k:
                torch.testing.assert_close(cache.k[layer], whole.k[layer], atol=1e-6, rtol=0)
                torch.testing.assert_close(cache.v[layer], whole.v[layer], atol=1e-6, rtol=0)
