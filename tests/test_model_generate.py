"""Generation: greedy equals transformers token for token; the sampler keeps exactly the documented support."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reallm.errors import UserError
from reallm.model import GenerationConfig, keyed_uniforms, load_hf_model, packed_logprobs, sampling_step
from reallm.model.generate import apply_top_k_top_p, generate, load_tokenizer, tokenize_prompts
from reallm.model.losses import answer_loss_mask

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

PAD = 3


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """The tiny checkpoints: the shared conftest fixture when there is one, else built here."""
    try:
        return request.getfixturevalue("tiny_assets")
    except pytest.FixtureLookupError:
        from reallm.assets import make_tiny_assets

        return make_tiny_assets(str(tmp_path_factory.getbasetemp() / "tiny_assets"))


def _prompts(tiny, name: str) -> list[list[int]]:
    tok = load_tokenizer(tiny[name])
    return tokenize_prompts(tok, ["12+34=", "hello world, add these", "7+8=", "The sum of two"])


def _hf_greedy(hf, prompt, max_new, eos, min_new=0):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=min_new, do_sample=False,
                      eos_token_id=eos, pad_token_id=PAD, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama_tied"])
def test_greedy_equals_transformers_generate(tiny, name):
    model = load_hf_model(tiny[name]).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32).eval()
    prompts = _prompts(tiny, name)
    # Random weights rarely emit the real EOS: promote a token greedy decoding does emit to EOS, so
    # that some sequences stop early and others run to max_new_tokens.
    free = _hf_greedy(hf, prompts[0], 16, eos=None)
    eos = next(t for t in free[3:] if t != PAD)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=16, greedy=True), eos_token_id=eos,
                   pad_token_id=PAD)
    for b, (prompt, ours) in enumerate(zip(prompts, out.sequences(), strict=True)):
        ref = _hf_greedy(hf, prompt, 16, eos)
        assert ours == ref, (b, ours, ref)
        assert bool(out.no_eos_B[b]) == (eos not in ref)
        assert (out.tokens_BN[b, len(ours):] == PAD).all()
        assert (out.logprobs_BN[b, len(ours):] == 0).all()
    assert out.no_eos_B.any() and not out.no_eos_B.all()
    # Greedy picks the most likely token: every log-prob is the max of its distribution, so <= 0 and
    # > log(1/V) (a token beats the uniform).
    lp = torch.cat(out.logprobs())
    assert (lp <= 0).all() and (lp > -torch.log(torch.tensor(float(model.spec.vocab_size)))).all()


def test_greedy_min_new_tokens_equals_transformers(tiny):
    model = load_hf_model(tiny["llama"]).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).eval()
    prompts = _prompts(tiny, "llama")
    eos = _hf_greedy(hf, prompts[1], 4, eos=None)[1]  # emitted at position 1 without the ban
    cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=6, greedy=True)
    out = generate(model, prompts, cfg, eos_token_id=eos, pad_token_id=PAD)
    for prompt, ours in zip(prompts, out.sequences(), strict=True):
        assert ours == _hf_greedy(hf, prompt, 12, eos, min_new=6)
        assert eos not in ours[:6] and 6 <= len(ours) <= 12


def test_greedy_with_sliding_window_equals_transformers(tmp_path):
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(str(tmp_path / "m"))
    hf = hf.eval()
    model = load_hf_model(str(tmp_path / "m")).eval()
    prompts = [[1, 5, 9, 11, 20, 7, 8, 30, 31], [1, 40, 41]]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=10, greedy=True), eos_token_id=None,
                   pad_token_id=PAD)
    for prompt, ours in zip(prompts, out.sequences(), strict=True):
        assert ours == _hf_greedy(hf, prompt, 10, eos=None)


# -- the sampler on known distributions ------------------------------------------------------------------


def test_top_k_keeps_exactly_k_even_with_ties():
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -1.0], [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    kept = torch.isfinite(apply_top_k_top_p(z.clone(), 2, 1.0))
    assert kept.sum(1).tolist() == [2, 2]
    assert kept[1].tolist() == [True, True, False, False, False, False]
    assert torch.isfinite(apply_top_k_top_p(z.clone(), 6, 1.0)).all()
    # top_k above the vocabulary is clamped, not an error.
    cfg = GenerationConfig(top_k=1000)
    tok, _, mask = sampling_step(z, GenerationConfig(top_k=1000, return_logits_mask=True), 0, [], torch.zeros(2))
    assert not mask.any() and cfg.top_k == 1000


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    z = probs.log()
    assert torch.isfinite(apply_top_k_top_p(z.clone(), 0, 0.75)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(apply_top_k_top_p(z.clone(), 0, 0.85)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(apply_top_k_top_p(z.clone(), 0, 0.3)).tolist() == [[False, True, False, False]]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 50, generator=g) * 2
    for top_p in (0.1, 0.5, 0.9, 0.99):
        kept = torch.isfinite(apply_top_k_top_p(z.clone(), 0, top_p))
        p = z.softmax(-1)
        mass = (p * kept).sum(-1)
        smallest_kept = torch.where(kept, p, torch.ones_like(p)).min(-1).values
        largest_removed = torch.where(kept, torch.zeros_like(p), p).max(-1).values
        assert (mass >= top_p - 1e-6).all()  # reaches top_p ...
        assert (mass - smallest_kept < top_p + 1e-6).all()  # ... and is minimal
        assert (smallest_kept >= largest_removed).all()  # and is a top set


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.8)])
def test_sample_frequencies_match_the_processed_distribution(temperature, top_k, top_p):
    z = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 40_000
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, return_logits_mask=True)
    u = torch.from_numpy(keyed_uniforms(11, 0, range(n), 1)[:, 0])
    tok, logp, mask = sampling_step(z.expand(n, -1), cfg, 0, [], u)
    expected = apply_top_k_top_p((z / temperature)[None].clone(), top_k, top_p).softmax(-1)[0]
    freq = torch.bincount(tok, minlength=8).double() / n
    assert (freq - expected.double()).abs().max() < 0.01  # ~4 standard deviations at n = 40000
    assert (expected[tok] > 0).all()  # never a removed token
    torch.testing.assert_close(logp, expected.log()[tok], atol=1e-6, rtol=0)
    assert torch.equal(mask[0], expected == 0)


def test_keyed_uniforms_depend_only_on_their_key():
    a = keyed_uniforms(1, 2, [5, 6, 7], 4)
    b = keyed_uniforms(1, 2, [7], 4)
    assert a.shape == (3, 4) and (a[2] == b[0]).all()
    assert not (keyed_uniforms(1, 3, [7], 4) == b).any()
    assert not (keyed_uniforms(2, 2, [7], 4) == b).any()
    big = keyed_uniforms(0, 0, range(20_000), 1)
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean() - 0.5) < 0.01


# -- sampled generation on a model ------------------------------------------------------------------------


def test_sampling_is_keyed_by_seed_step_and_sequence_not_by_batch(tiny):
    model = load_hf_model(tiny["qwen2"]).eval()
    prompts = _prompts(tiny, "qwen2")
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95)
    kw = dict(eos_token_id=2, pad_token_id=PAD, seed=3, step=1)
    batch = generate(model, prompts, cfg, seq_ids=[10, 11, 12, 13], **kw)
    for b in (3, 1):
        alone = generate(model, [prompts[b]], cfg, seq_ids=[10 + b], **kw)
        assert alone.sequences()[0] == batch.sequences()[b]
        torch.testing.assert_close(alone.logprobs()[0], batch.logprobs()[b], atol=1e-5, rtol=0)
    other_step = generate(model, prompts, cfg, seq_ids=[10, 11, 12, 13], eos_token_id=2, pad_token_id=PAD, seed=3,
                          step=2)
    assert other_step.sequences() != batch.sequences()


def test_min_and_max_new_tokens_are_honoured_when_sampling(tiny):
    model = load_hf_model(tiny["llama"]).eval()
    prompts = _prompts(tiny, "llama") * 4
    eos = list(range(4, 200))  # half the vocabulary ends a sequence: about every other draw would stop it
    cfg = GenerationConfig(max_new_tokens=9, min_new_tokens=5, temperature=1.0)
    out = generate(model, prompts, cfg, eos_token_id=eos, pad_token_id=PAD, seq_ids=range(100, 116))
    for b, seq in enumerate(out.sequences()):
        assert 5 <= len(seq) <= 9
        assert not set(seq[:5]) & set(eos)
        ends_with_eos = seq[-1] in eos
        assert bool(out.no_eos_B[b]) == (not ends_with_eos)
        assert not set(seq[:-1][5:]) & set(eos)  # stopped at the first EOS
        if not ends_with_eos:
            assert len(seq) == 9
    assert out.no_eos_B.any() and not out.no_eos_B.all()


def test_generation_logprobs_and_logits_mask_are_reproduced_by_training_logprobs(tiny):
    """What PPO relies on: recomputing log-probs with the same temperature and logits mask gives the
    generation log-probs (the mask carries top-k, top-p and the min_new_tokens EOS ban)."""
    model = load_hf_model(tiny["mistral"]).eval()
    prompts = _prompts(tiny, "mistral")
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=3, temperature=0.7, top_k=30, top_p=0.9,
                           return_logits_mask=True)
    out = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=PAD, seed=5)
    assert out.logits_mask_BNV.shape[:2] == out.tokens_BN.shape
    packed = out.with_prompts(prompts)
    tokens, cu, mask = packed["tokens"], packed["cu_seqlens"], packed["logits_mask"]
    gen_rows = answer_loss_mask(tokens, cu, packed["prompt_mask"])
    assert int(gen_rows.sum()) == int(out.lengths_B.sum())
    kept = (~mask[gen_rows]).sum(-1)
    assert (kept >= 1).all() and (kept <= 30).all()
    assert mask[gen_rows][:, 2].any()  # EOS banned at the first min_new_tokens positions
    with torch.no_grad():
        lp = packed_logprobs(model(tokens, cu), tokens, cu, temperature=0.7, logits_mask_TV=mask)
    torch.testing.assert_close(lp[gen_rows], packed["logprobs"][gen_rows], atol=1e-4, rtol=0)
    assert (packed["logprobs"][~gen_rows] == 0).all()
    flat = out.packed()
    assert flat["tokens"].shape[0] == int(out.lengths_B.sum()) == flat["logits_mask"].shape[0]
    assert flat["cu_seqlens"].tolist()[-1] == flat["tokens"].shape[0]


def test_tokenize_prompts_is_the_tokenizers_own_encoding(tiny):
    tok = load_tokenizer(tiny["llama"])
    texts = ["12+34=", "Hello, world!"]
    ids = tokenize_prompts(tok, texts)
    assert ids == [tok(t)["input_ids"] for t in texts]
    assert all(seq[0] == tok.bos_token_id for seq in ids)


def test_generation_config_validation_and_from_config():
    with pytest.raises(UserError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(UserError, match="top_p"):
        GenerationConfig(top_p=0.0)
    from reallm.config.schema import PPOHyperparameters

    cfg = GenerationConfig.from_config(PPOHyperparameters())
    assert (cfg.max_new_tokens, cfg.min_new_tokens, cfg.top_k, cfg.top_p, cfg.return_logits_mask) == (256, 256, 200,
                                                                                                       0.9, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager(tiny):
    model = load_hf_model(tiny["llama"], device="cuda").eval()
    prompts = _prompts(tiny, "llama")
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=40)
    eager = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=PAD, seed=1)
    graph = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=PAD, seed=1, use_cuda_graph=True)
    assert eager.sequences() == graph.sequences()


@pytest.mark.parametrize("greedy", [True, False])
def test_sampling_in_row_chunks_equals_one_pass(monkeypatch, greedy):
    """Rows are sampled in bounded chunks (memory); the result is the one-pass result, row for row."""
    import reallm.model.generate as gen

    g = torch.Generator().manual_seed(3)
    z = torch.randn(11, 50, generator=g) * 3
    cfg = GenerationConfig(greedy=greedy, temperature=0.7, top_k=20, top_p=0.9, min_new_tokens=2,
                           return_logits_mask=True)
    u = torch.from_numpy(keyed_uniforms(5, 1, range(11), 1)[:, 0])
    one = sampling_step(z, cfg, 0, [3], u, vocab_size=48)
    monkeypatch.setattr(gen, "sampling_chunk_logits", lambda lean: 3 * 50 if lean else 0)
    assert gen.sampling_chunk_rows(50, 3 * 50, 11) == 3  # 3 rows a chunk, a ragged last chunk
    chunked = sampling_step(z, dataclasses.replace(cfg, lean_memory=True), 0, [3], u, vocab_size=48)
    for a, b in zip(one, chunked):
        assert torch.equal(a, b)
    assert one[2][:, 3].all() and one[2][:, 48:].all()  # EOS banned (t < min_new_tokens), tp padding removed


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_kept_caches_and_decode_steps_generate_as_fresh_ones(device):
    """``ParallelModel.keep_decode_graphs``: a second call reuses the first call's KV cache (and on CUDA its
    captured decode step) and generates exactly what a fresh call does, although the cache still holds the
    first call's keys; an entry whose weights moved is dropped."""
    from executor.comm import Group
    from reallm.parallel import ParallelModel
    from reallm.parallel.groups import ParallelGroups
    from reallm.placement import Placement
    from reallm.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4,
                     num_kv_heads=2, head_dim=16, vocab_size=101, source="tiny")
    groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))
    pm = ParallelModel.build(None, groups, spec=spec, dtype=torch.float32, device=device, init_seed=3)
    g = torch.Generator().manual_seed(5)
    calls = [[torch.randint(3, 101, (n,), generator=g).tolist() for n in lengths]
             for lengths in ((5, 9, 2), (11, 3, 7), (4, 4, 4))]
    cfg = GenerationConfig(max_new_tokens=7, temperature=0.9, top_k=30)

    def run(step):
        out = pm.generate(calls[step], cfg, eos_token_id=None, pad_token_id=PAD, seed=2, step=step)
        return out.sequences(), out.logprobs_BN

    fresh = [run(k) for k in range(3)]
    pm.keep_decode_graphs()
    kept = [run(0)]
    (entry,) = pm.decode_pool.entries
    kept += [run(1), run(2)]
    (again,) = pm.decode_pool.entries
    assert again[2] is entry[2] and again[3] is entry[3]  # the same cache and decode runner, reused
    for (seq_f, lp_f), (seq_k, lp_k) in zip(fresh, kept):
        assert seq_k == seq_f
        torch.testing.assert_close(lp_k, lp_f, atol=1e-5, rtol=0)
    assert pm.decode_pool.take(entry[0], entry[1] + 16) is None  # weights elsewhere: dropped
    assert pm.decode_pool.entries == []
