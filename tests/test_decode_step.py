"""A whole decode step as one stream program (reallm/kernels/decode_step.py): its torch definition against
HF transformers (CPU), and the kernel against that definition (sm_90 GPU)."""

import pytest
import torch

from reallm.kernels import decode_step
from reallm.kernels.decode_step import DecodeStep
from reallm.kernels.decode_stream import stream_cache

transformers = pytest.importorskip("transformers")

LENGTHS = [3, 7, 1, 130, 20]  # cached prompt lengths of the rows (130: keys over two 128-position slots)
MAX_LEN = 256


def _hf_model(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   intermediate_size=384, vocab_size=512, num_hidden_layers=2, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, max_position_embeddings=MAX_LEN, tie_word_embeddings=False,
                                   initializer_range=0.08)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # representable in bf16: the step's weights are exactly the model's
            p.copy_(p.bfloat16().float())
            if p.dim() == 1:  # norm weights away from 1, so that folding them into the matrices is tested
                p.uniform_(0.5, 1.5)
    return model


def _layer_kv(cache, layer):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _hf_step(model, tokens, next_tokens):
    """Per row: HF prefill of its prompt, then one decode step. Returns the logits [B, V] and the caches
    (fp32, per layer [B, kv, MAX_LEN, 64]) as they were before the step and the entries the step added."""
    layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    before = [[torch.zeros(len(tokens), kv, MAX_LEN, 64) for _ in range(layers)] for _ in range(2)]
    added = [[torch.zeros(len(tokens), kv, 64) for _ in range(layers)] for _ in range(2)]
    logits = []
    with torch.no_grad():
        for b, prompt in enumerate(tokens):
            out = model(torch.tensor([prompt]), use_cache=True)
            n = len(prompt)
            for layer in range(layers):
                for i, t in enumerate(_layer_kv(out.past_key_values, layer)):
                    before[i][layer][b, :, :n] = t[0]
            step = model(torch.tensor([[next_tokens[b]]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(step.logits[0, -1])
            for layer in range(layers):
                for i, t in enumerate(_layer_kv(step.past_key_values, layer)):
                    added[i][layer][b] = t[0, :, n]
    return torch.stack(logits), before, added


def _setup(device, seed=0):
    model = _hf_model(seed)
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, 512, (n,), generator=g).tolist() for n in LENGTHS]
    next_tokens = torch.randint(0, 512, (len(LENGTHS),), generator=g)
    logits, before, added = _hf_step(model, tokens, next_tokens)
    def full(c):  # 64 rows like an executor's batch: the rows past the prompts are padding
        rows = torch.zeros(64, *c.shape[1:])
        rows[:c.shape[0]] = c
        return stream_cache(rows.to(device, torch.bfloat16))

    k_caches = [full(c) for c in before[0]]
    v_caches = [full(c) for c in before[1]]
    step = DecodeStep.from_hf(model.to(device), k_caches, v_caches)
    emb = model.model.embed_tokens.weight[next_tokens.to(device)].to(torch.bfloat16)
    step.set_inputs(emb, torch.tensor(LENGTHS, device=device))
    return step, logits, added, k_caches, v_caches


def test_definition_matches_hf_transformers():
    step, hf_logits, added, k_caches, v_caches = _setup("cpu")
    logits = step.reference()[:len(LENGTHS)].float()
    scale = hf_logits.abs().max()
    err = (logits - hf_logits).abs().max() / scale
    assert err < 2e-2, f"logits differ from HF by {err:.3g} of their range"
    assert torch.equal(logits.argmax(-1), hf_logits.argmax(-1))
    for layer in range(2):  # the step appended the rows' rope'd keys and values at their positions
        for cache, want in ((k_caches[layer], added[0][layer]), (v_caches[layer], added[1][layer])):
            got = torch.stack([stream_cache(cache)[b, :, n] for b, n in enumerate(LENGTHS)]).float()
            torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    assert k_caches[0][len(LENGTHS):].abs().sum() == 0  # padding rows cache nothing


def test_decode_step_rejects_bad_shapes():
    model = _hf_model()
    def caches(heads=2, max_len=128):
        return [torch.zeros(2, heads, max_len, 64, dtype=torch.bfloat16) for _ in range(2)]

    k, v = caches(), caches()
    with pytest.raises(ValueError, match="2 layers but 1 k"):
        DecodeStep.from_hf(model, k[:1], v)
    with pytest.raises(ValueError, match=r"k_cache must be a contiguous bf16 \[rows, 2, max_len, 64\]"):
        DecodeStep.from_hf(model, caches(heads=3), caches(heads=3))
    with pytest.raises(ValueError, match="max_len must be a multiple of 128, got 96"):
        DecodeStep.from_hf(model, caches(max_len=96), caches(max_len=96))
    with pytest.raises(ValueError, match="caches overlap each other or an earlier layer's"):
        DecodeStep.from_hf(model, k, k)
    with pytest.raises(ValueError, match="caches overlap"):
        DecodeStep.from_hf(model, [k[0], k[0]], v)
    state = dict(model.state_dict())
    kw = dict(layers=2, heads=4, eps=1e-5, inv_freq=model.model.rotary_emb.inv_freq, k_caches=k, v_caches=v)
    with pytest.raises(ValueError, match=r"k_proj.weight is \[128, 256\], expected \[64, 256\]"):
        DecodeStep(state, kv_heads=1, **kw)
    with pytest.raises(ValueError, match=r"no biases; the weights have \['model.layers.1.mlp.up_proj.bias'\]"):
        DecodeStep({**state, "model.layers.1.mlp.up_proj.bias": torch.zeros(384)}, kv_heads=2, **kw)
    step = DecodeStep.from_hf(model, k, v)
    with pytest.raises(ValueError, match="one position each"):
        step.set_inputs(torch.zeros(3, 256, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="3 rows but the caches hold 2"):
        step.set_inputs(torch.zeros(3, 256, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"positions must be in \[0, 128\), got 5 .. 128"):
        step.set_inputs(torch.zeros(2, 256, dtype=torch.bfloat16), torch.tensor([5, 128]))


def test_program_orders_what_the_kernel_reads():
    """A norm must read the rows its dep wrote, a residual written in the launch must be a normed input on
    the dep chain: the kernel waits for nothing else."""
    from reallm.kernels.decode_stream import ROWS, StreamProgram, chunked_buffer

    def w(n, k):
        return torch.zeros(n, k, dtype=torch.bfloat16)

    prog = StreamProgram()
    x, h1, h2, h3, h4 = (chunked_buffer(128, "cpu") for _ in range(5))
    ss = torch.zeros(ROWS)
    r1 = prog.add(w(128, 128), x, h1, out="residual", residual=x, norm=(ss, 1e-5))
    r2 = prog.add(w(128, 128), h1, h2, out="residual", residual=x, dep=r1)  # x: ready before the launch
    with pytest.raises(ValueError, match="norm over product 1's rows needs dep=1"):
        prog.add(w(128, 128), h1, h3, dep=r1, norm=(r2, 1e-5))
    with pytest.raises(ValueError, match="residual is written in this launch but is not the input of a normed"):
        prog.add(w(128, 128), h2, h3, out="residual", residual=h1, dep=r2)  # h1 read by an unnormed product
    n3 = prog.add(w(128, 128), h2, h3, dep=r2, norm=(r2, 1e-5))
    prog.add(w(128, 128), h3, h4, out="residual", residual=h2, dep=n3)  # h2: the normed input of n3


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the kernel needs an sm_90 CUDA GPU")


@needs_sm90
@pytest.mark.parametrize("grid,variant", [(None, 0), (3, 0), (1, 1), (7, 2)])
def test_kernel_matches_the_definition_and_replays(grid, variant):
    """Few CTAs give each many operations (the rings wrap inside attention); replays rewrite the same cache
    entries and must leave the counters and sums of squares zeroed."""
    assert decode_step.available(), "decode_stream kernel did not build"
    step, hf_logits, _, k_caches, v_caches = _setup("cuda")
    k0 = [c.clone() for c in k_caches]
    v0 = [c.clone() for c in v_caches]
    prog = step.program
    want = step.reference().clone()
    want_k = [c.clone() for c in k_caches]
    want_v = [c.clone() for c in v_caches]
    for launch in range(3):
        for c, c0 in zip(k_caches + v_caches, k0 + v0):
            c.copy_(c0)
        for buf in step.buffers:
            buf.zero_()
        step.logits.zero_()
        step.run(grid=grid, variant=variant)
        torch.cuda.synchronize()
        for i, p in enumerate(prog.products):  # each operation against torch on the kernel's own inputs
            ref = prog.reference_output(i)
            if p.out == "qkv":
                ref = ref[:, :p.attn["q_cols"]]
            torch.testing.assert_close(prog.output(i).float(), ref.float(), rtol=2e-2, atol=2e-2,
                                       msg=lambda m, i=i, launch=launch, out=p.out: f"launch {launch}, op {i} ({out}): {m}")
        for got, ref in zip(k_caches + v_caches, want_k + want_v):
            torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
        n = len(LENGTHS)
        torch.testing.assert_close(step.logits[:n].float(), want[:n].float(), rtol=3e-2,
                                   atol=3e-2 * float(want.abs().max()))
        assert torch.equal(step.logits[:n].float().argmax(-1).cpu(), hf_logits.argmax(-1))


def test_stream_cache_layout_is_an_involution_with_swizzled_units():
    c = torch.randn(2, 3, 16, 64).to(torch.bfloat16)
    s = stream_cache(c)
    assert torch.equal(stream_cache(s), c)
    assert torch.equal(s[1, 2, 5, (3 ^ 5) * 8:(3 ^ 5) * 8 + 8], c[1, 2, 5, 24:32])  # position 5: unit 3 at 3 ^ 5
    assert torch.equal(s[0, 0, 8], c[0, 0, 8])  # position 8: units in place


@needs_sm90
@pytest.mark.parametrize("rows", [5, 64])
def test_set_tokens_launch_equals_gather_and_set_inputs(rows):
    """The one-launch input preparation (embedding gather into the chunked layout, sums of squares,
    positions; padding rows zero at position -1) against the torch gather and ``set_inputs``."""
    assert decode_step.available(), "decode_stream kernel did not build"
    assert hasattr(decode_step.decode_stream._EXT.load(), "prepare")  # the launch, not the torch fallback
    step = _setup("cuda")[0]
    g = torch.Generator().manual_seed(rows)
    embed = torch.randn(512, 256, generator=g).to("cuda", torch.bfloat16)
    tokens = torch.randint(0, 512, (rows,), generator=g).cuda()
    positions = torch.randint(0, MAX_LEN, (rows,), generator=g).cuda()
    step.set_inputs(embed[tokens], positions)
    want = [t.clone() for t in (step.h0, step.ss0, step.positions)]
    for t in (step.h0, step.ss0):
        t.fill_(7.0)  # stale values the launch must overwrite, padding rows included
    step.positions.fill_(99)
    step.set_tokens(tokens, positions, embed)
    assert torch.equal(step.h0, want[0])
    torch.testing.assert_close(step.ss0, want[1], rtol=1e-5, atol=0)
    assert torch.equal(step.positions, want[2])
    assert int((step.positions == -1).sum()) == 64 - rows
