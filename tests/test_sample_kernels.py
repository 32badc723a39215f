"""The sampling kernels (reallm/kernels/sample.py: greedy pick, inverse-CDF draw at temperature T) against
their torch definitions (CUDA with Triton), and ``sampling_step``'s fast paths on CUDA against the same step
on CPU."""

import pytest
import torch

from reallm.kernels import sample
from reallm.model.generate import GenerationConfig, sampling_step

needs_triton = pytest.mark.skipif(sample.triton is None or not torch.cuda.is_available(),
                                  reason="the kernel needs Triton and a CUDA GPU")


def _logits(B, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, V, generator=g) * 3).to(dtype)
    x[1, :] = 0.5                          # a row of ties: the first index wins
    x[2, V // 3] = x[2, V - 1] = 40.0      # two maxima far apart (different lanes and blocks)
    x[3, : V // 2] = float("-inf")         # half the row removed
    x[4, 7] = 30.0
    x[5, :] = float("-inf")                # nothing left: log-prob NaN, as torch's
    return x


@needs_triton
@pytest.mark.parametrize("V,dtype", [(32000, torch.bfloat16), (151936, torch.bfloat16), (1000, torch.float32),
                                     (16385, torch.float32), (64, torch.bfloat16)])
def test_pick_matches_argmax_and_log_softmax(V, dtype):
    x = _logits(9, V, dtype).cuda()
    tok, lp = sample.greedy(x)
    want_tok, want_lp = sample.greedy_reference(x)
    assert torch.equal(tok[:5], want_tok[:5]) and torch.equal(tok[6:], want_tok[6:])
    assert int(tok[1]) == 0 and int(tok[2]) == V // 3
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(lp[5])
    sliced = x[:, : V - 1]  # a row stride longer than the row
    got, want = sample.greedy(sliced), sample.greedy_reference(sliced)
    assert torch.equal(got[0][6:], want[0][6:])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_triton
def test_greedy_sampling_step_on_cuda_equals_cpu(monkeypatch):
    x = _logits(64, 32000, torch.bfloat16, seed=1)[6:]
    cfg = GenerationConfig(max_new_tokens=4, greedy=True)
    calls = []
    pick = sample.greedy
    monkeypatch.setattr(sample, "greedy", lambda z, *a: (calls.append(z.shape), pick(z, *a))[1])
    tok_c, lp_c, _ = sampling_step(x, cfg, 0, [2], None, 32000)
    assert calls == []  # (CPU: the torch ops)
    tok_g, lp_g, _ = sampling_step(x.cuda(), cfg, 0, [2], None, 32000)
    assert calls == [x.shape]  # the one-pass kernel ran
    assert torch.equal(tok_g.cpu(), tok_c)
    torch.testing.assert_close(lp_g.cpu(), lp_c, rtol=1e-5, atol=1e-5)
    masked = GenerationConfig(max_new_tokens=4, greedy=True, min_new_tokens=2)  # EOS suppressed: the torch path
    assert int(sampling_step(x.cuda(), masked, 0, [int(tok_c[0])], None, 32000)[0][0]) != int(tok_c[0])
    padded = x.clone()
    padded[:, -5:] = 100.0  # tp vocabulary padding holds the maximum: never a token
    assert int(sampling_step(padded.cuda(), cfg, 0, [], None, 32000 - 5)[0].max()) < 32000 - 5
    with_mask = GenerationConfig(max_new_tokens=4, greedy=True, return_logits_mask=True)
    assert sampling_step(x.cuda(), with_mask, 0, [], None, 32000)[2] is not None
    assert len(calls) == 3  # (the EOS ban too: -inf in the kernel)


@needs_triton
@pytest.mark.parametrize("V,temperature", [(151936, 1.0), (32000, 0.7), (1000, 1.3)])
def test_plain_draw_matches_the_float64_inverse_cdf(V, temperature):
    x = _logits(64, V, torch.bfloat16, seed=3)[6:].cuda()
    u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tok, lp = sample.plain(x, u, temperature)
    want_tok, want_lp = sample.plain_reference(x, u.cuda(), temperature)
    assert torch.equal(tok, want_tok)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    padded = x.clone()
    padded[:, -7:] = 100.0  # a tp vocabulary padding: never drawn
    assert int(sample.plain(padded, u, temperature, vocab_size=V - 7)[0].max()) < V - 7


@needs_triton
def test_plain_draw_frequencies_are_the_softmax():
    """Inverse CDF at evenly spread uniforms: each token is drawn as often as its probability says (±1)."""
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0, float("-inf"), 0.0]])
    n = 4096
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tok, lp = sample.plain(z.expand(n, -1).contiguous().cuda(), u, 0.8)
    counts = torch.bincount(tok.cpu(), minlength=6).double()
    p = torch.softmax(z[0].double() / 0.8, -1)
    assert (counts - n * p).abs().max() <= 1 and counts[4] == 0
    torch.testing.assert_close(lp.cpu(), torch.log(p.float())[tok.cpu()], rtol=1e-5, atol=1e-5)


@needs_triton
def test_plain_sampling_step_takes_the_kernel_only_without_filters(monkeypatch):
    x = _logits(64, 32000, torch.bfloat16, seed=5)[6:]
    u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    calls = []
    draw = sample.plain
    monkeypatch.setattr(sample, "plain", lambda *a, **k: (calls.append(1), draw(*a, **k))[1])
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.9)
    tok_c, lp_c, _ = sampling_step(x, cfg, 0, [2], u, 32000)
    tok_g, lp_g, _ = sampling_step(x.cuda(), cfg, 0, [2], u.cuda(), 32000)
    assert calls == [1] and torch.equal(tok_g.cpu(), tok_c)
    torch.testing.assert_close(lp_g.cpu(), lp_c, rtol=1e-5, atol=1e-5)
    # EOS banned before min_new_tokens (as PPO's fixed-length generation runs): the kernel, the torch answer
    hot = x.clone()
    hot[:, 7] = 50.0  # token 7 would be drawn every time
    banned = GenerationConfig(max_new_tokens=4, temperature=0.9, min_new_tokens=4)
    tok_c, lp_c, _ = sampling_step(hot, banned, 0, [7, 3], u, 32000)
    tok_g, lp_g, _ = sampling_step(hot.cuda(), banned, 0, [7, 3], u.cuda(), 32000)
    assert calls == [1, 1] and torch.equal(tok_g.cpu(), tok_c) and not bool(((tok_c == 7) | (tok_c == 3)).any())
    torch.testing.assert_close(lp_g.cpu(), lp_c, rtol=1e-5, atol=1e-5)
    calls.clear()
    calls.append(1)
    for filtered in (GenerationConfig(max_new_tokens=4, top_k=50), GenerationConfig(max_new_tokens=4, top_p=0.9),
                     GenerationConfig(max_new_tokens=4, return_logits_mask=True)):
        sampling_step(x.cuda(), filtered, 0, [2], u.cuda(), 32000)
    assert calls == [1]
