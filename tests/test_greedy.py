"""The one-pass greedy pick (reallm/kernels/greedy.py) against its torch definition (CUDA with Triton), and
``sampling_step``'s greedy path on CUDA against the same step on CPU."""

import pytest
import torch

from reallm.kernels import greedy
from reallm.model.generate import GenerationConfig, sampling_step

needs_triton = pytest.mark.skipif(greedy.triton is None or not torch.cuda.is_available(),
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
    tok, lp = greedy.pick(x)
    want_tok, want_lp = greedy.reference(x)
    assert torch.equal(tok[:5], want_tok[:5]) and torch.equal(tok[6:], want_tok[6:])
    assert int(tok[1]) == 0 and int(tok[2]) == V // 3
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(lp[5])
    sliced = x[:, : V - 1]  # a row stride longer than the row
    got, want = greedy.pick(sliced), greedy.reference(sliced)
    assert torch.equal(got[0][6:], want[0][6:])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_triton
def test_greedy_sampling_step_on_cuda_equals_cpu(monkeypatch):
    x = _logits(64, 32000, torch.bfloat16, seed=1)[6:]
    cfg = GenerationConfig(max_new_tokens=4, greedy=True)
    calls = []
    pick = greedy.pick
    monkeypatch.setattr(greedy, "pick", lambda z: (calls.append(z.shape), pick(z))[1])
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
    assert len(calls) == 1
