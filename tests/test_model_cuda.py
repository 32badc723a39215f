"""The CUDA paths (skipped without a GPU): varlen attention equals the SDPA reference, CUDA-graph decode
equals eager decode, and a bf16 training step with fp32 masters learns."""

from __future__ import annotations

import pytest
import torch

from reallm.model import (
    AttnBackend,
    GenerationConfig,
    MixedPrecisionAdamW,
    OptimizerSettings,
    PackedSeqs,
    load_hf_model,
    pack_sequences,
    sft_loss,
    sft_micro_batch,
    train_step,
)
from reallm.model.attention import sdpa_loop_attention, varlen_attention, varlen_usable
from reallm.model.generate import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """The tiny checkpoints: the shared conftest fixture when there is one, else built here."""
    try:
        return request.getfixturevalue("tiny_assets")
    except pytest.FixtureLookupError:
        from reallm.assets import make_tiny_assets

        return make_tiny_assets(str(tmp_path_factory.getbasetemp() / "tiny_assets"))


def _seqs(vocab: int, lengths, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def _assert_attention_equals_reference(fn, lengths, window=None, seed=0):
    """``fn(q, k, v, seqs, scale)`` against the per-sequence SDPA reference: output and input gradients."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    seqs = PackedSeqs.from_cu_seqlens(cu)
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k = torch.randn(T, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    v = torch.randn(T, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    w = torch.randn(T, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    outs, grads = [], []
    for f in (fn, lambda q, k, v, seqs, scale: sdpa_loop_attention(q, k, v, seqs, scale, window)):
        o = f(q, k, v, seqs, 64 ** -0.5)
        (o.float() * w.float()).sum().backward()
        outs.append(o.float())
        grads.append([t.grad.float().clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("window", [None, 32])
def test_varlen_attention_equals_the_sdpa_reference(window):
    q0 = torch.empty(1, 8, 64, device="cuda", dtype=torch.bfloat16)
    if not varlen_usable(q0, window):
        pytest.skip(f"torch {torch.__version__} has no usable varlen_attn for window={window}")
    _assert_attention_equals_reference(lambda q, k, v, seqs, scale: varlen_attention(q, k, v, seqs, scale, window),
                                       [1, 17, 128, 300], window)


def test_cuda_fp32_logits_equal_cpu_and_bf16_backends_agree(tiny):
    cpu = load_hf_model(tiny["qwen2"]).eval()
    gpu = load_hf_model(tiny["qwen2"], device="cuda").eval()
    seqs = _seqs(384, (5, 40, 1, 77))
    tokens, cu = pack_sequences(seqs)
    with torch.no_grad():
        torch.testing.assert_close(gpu(tokens.cuda(), cu.cuda()).cpu(), cpu(tokens, cu), atol=1e-4, rtol=0)
        bf = load_hf_model(tiny["qwen2"], device="cuda", dtype=torch.bfloat16).eval()
        auto = bf(tokens.cuda(), cu.cuda()).float()
        for layer in bf.model.layers.values():
            layer.self_attn.backend = AttnBackend.SDPA_LOOP
        ref = bf(tokens.cuda(), cu.cuda()).float()
    torch.testing.assert_close(auto, ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("greedy", [True, False])
def test_cuda_graph_decode_equals_eager_decode(tiny, greedy):
    model = load_hf_model(tiny["llama"], device="cuda").eval()
    prompts = _seqs(384, (3, 9, 5, 12), seed=1)
    cfg = GenerationConfig(max_new_tokens=16, greedy=greedy, temperature=0.8, top_k=40, top_p=0.95)
    eager = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=3, seed=1)
    graph = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=3, seed=1, use_cuda_graph=True)
    assert eager.sequences() == graph.sequences()
    torch.testing.assert_close(eager.logprobs_BN, graph.logprobs_BN, atol=1e-5, rtol=0)
    cpu = generate(load_hf_model(tiny["llama"]).eval(), prompts, cfg, eos_token_id=2, pad_token_id=3, seed=1)
    assert cpu.sequences() == eager.sequences()  # randomness is device-independent


def test_bf16_training_step_with_fp32_masters_learns(tiny):
    model = load_hf_model(tiny["mistral"], device="cuda", dtype=torch.bfloat16)
    model.gradient_checkpointing = True
    seqs = _seqs(384, (30, 50, 20, 64), seed=2)
    mb = sft_micro_batch(seqs, [5, 5, 5, 5], device="cuda")
    opt = MixedPrecisionAdamW(model.named_parameters(), OptimizerSettings(lr=3e-3, warmup_steps_proportion=0.0),
                              total_steps=8)
    assert all(m.dtype == torch.float32 for m in opt.masters.values())
    losses = [train_step(model, opt, [mb], sft_loss)["loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]


def test_compiled_blocks_equal_eager_blocks_forward_and_backward(tiny):
    model = load_hf_model(tiny["mistral"], device="cuda", dtype=torch.float32)
    seqs = _seqs(384, (30, 50, 1, 64), seed=3)

    def loss_and_grads(compiled: bool, n: int):
        model.compile(compiled)
        model.zero_grad(set_to_none=True)
        mb = sft_micro_batch(seqs[:n], [5, 5, 0, 5][:n], device="cuda")
        loss, _ = sft_loss(model(mb["tokens"], mb["cu_seqlens"]), mb)
        loss.backward()
        return float(loss), {name: p.grad.clone() for name, p in model.named_parameters()}

    for n in (4, 3):  # the second token count exercises the compiled regions' dynamic shapes
        (l0, g0), (l1, g1) = loss_and_grads(False, n), loss_and_grads(True, n)
        assert abs(l0 - l1) < 1e-5
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_decode_kernel_steps_equal_the_sdpa_path(tiny, compiled):
    from reallm.kernels import decode_attention

    if not decode_attention.available():
        pytest.skip("no Triton")
    for name in ("llama", "mistral"):  # mistral: a sliding window
        model = load_hf_model(tiny[name], device="cuda", dtype=torch.float32).eval()
        prompts = _seqs(384, (3, 9, 5, 12, 40), seed=4)
        tokens, cu = pack_sequences(prompts, device="cuda")
        lengths = torch.tensor([len(p) for p in prompts], device="cuda")
        caches, logits = [], []
        for kernel in (False, True):
            model.use_decode_kernel = kernel
            model.compile(compiled and kernel)
            cache = model.new_kv_cache(len(prompts), 64)
            with torch.no_grad():
                model(tokens, cu, kv_cache=cache)
                steps = []
                for t in range(12):  # feed fixed tokens: both paths see identical inputs
                    tok = torch.full((len(prompts),), 5 + t, device="cuda")
                    steps.append(model.decode(tok, lengths + t, cache))
            caches.append(cache)
            logits.append(torch.stack(steps))
        model.compile(False)
        torch.testing.assert_close(logits[1], logits[0], atol=2e-4, rtol=1e-4)
        for layer in caches[0].k:
            torch.testing.assert_close(caches[1].k[layer], caches[0].k[layer], atol=1e-5, rtol=0)
            torch.testing.assert_close(caches[1].v[layer], caches[0].v[layer], atol=1e-5, rtol=0)


def test_batched_attention_equals_the_sdpa_reference():
    from reallm.model.attention import batched_attention, batched_usable

    cu = torch.tensor([0, 256, 512, 768], dtype=torch.int32, device="cuda")
    assert batched_usable(torch.empty(1, 8, 64, device="cuda", dtype=torch.bfloat16), PackedSeqs.from_cu_seqlens(cu),
                          None)
    _assert_attention_equals_reference(batched_attention, [256, 256, 256], seed=1)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_vocab_logprobs_equal_eager_forward_and_backward(masked):
    """The compiled per-chunk log-softmax passes (``LogitsShard.fused``) against the eager ones, bf16 logits,
    a padded vocabulary, a temperature, a logits mask and a ragged last chunk."""
    from executor.comm import Group
    from reallm.parallel.groups import AxisGroup
    from reallm.parallel.vocab import LogitsShard

    one = AxisGroup(Group((0,), None), (0,), 0)
    g = torch.Generator(device="cuda").manual_seed(0)
    T, V, Vp = 700, 1000, 1024
    logits = (torch.randn(T, Vp, device="cuda", generator=g) * 4).bfloat16()
    tokens = torch.randint(0, V, (T,), device="cuda", generator=g)
    cu = torch.tensor([0, 300, 301, 650, 700], device="cuda", dtype=torch.int32)
    mask = (torch.rand(T, V, device="cuda", generator=g) < 0.3) if masked else None
    out = {}
    for fused in (False, True):
        x = logits.clone().requires_grad_(True)
        lp = LogitsShard(x, 0, V, one, fused=fused).logprobs(tokens, cu, temperature=0.8, logits_mask=mask,
                                                                chunk_rows=128)
        (lp * torch.linspace(-1, 1, lp.numel(), device="cuda")).sum().backward()
        out[fused] = (lp.detach(), x.grad)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[True][1].float(), out[False][1].float(), atol=1e-2, rtol=1e-2)


def test_sum_of_squares_on_cuda_equals_fp64():
    from reallm.parallel.optim import sum_of_squares

    x = torch.randn(3 * 4096 * 7 + 123, device="cuda") * 1e-3
    want = (x.double() ** 2).sum()
    assert abs(float(sum_of_squares(x)) / float(want) - 1) < 1e-6
