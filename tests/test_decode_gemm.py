"""The fused small-batch decode product (``reallm.kernels.decode_gemm``) against its fp32 definition.

Runs wherever Triton is importable: on CUDA for real (tuned configurations), on CPU through Triton's
interpreter (``TRITON_INTERPRET=1``) with explicit configurations, split-K included; skipped otherwise.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from reallm.kernels import decode_gemm  # noqa: E402
from tests.test_decode_kernel import DEVICE  # noqa: E402,F401  (also patches the interpreter on CPU)

# Explicit configurations (split-K included) on both devices; the tuned choice once on CUDA.
CONFIGS = [{"BN": 16, "BK": 16, "SPLIT": 1}, {"BN": 32, "BK": 16, "SPLIT": 3}]


def _inputs(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    return g, x, w


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("M,N,K", [(3, 40, 48), (16, 64, 100), (1, 24, 32)])
@pytest.mark.parametrize("mode", ["plain", "norm_bias", "glu_norm", "residual"])
def test_matches_reference(M, N, K, mode, config):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    g, x, w = _inputs(M, N, K, dtype, M * 1000 + N + K)
    kw = {}
    if mode in ("norm_bias", "glu_norm"):
        kw["norm_weight"] = (1 + 0.1 * torch.randn(K, generator=g)).to(DEVICE, dtype)
        kw["eps"] = 1e-5
    if mode == "norm_bias":
        kw["bias"] = torch.randn(N, generator=g).to(DEVICE, dtype)
    if mode == "glu_norm":
        kw["glu"] = True
    if mode == "residual":
        kw["residual"] = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    want = decode_gemm.reference(x, w, **kw)
    for _ in range(2):  # a second launch finds the tile counters reset by the first
        got = decode_gemm.decode_linear(x, w, config=config, **kw)
        assert got.shape == want.shape
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(got.float(), want.float(), **tol)
    assert int(decode_gemm._counters(x.device, 1).abs().sum()) == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="the tuner times configurations on a GPU")
def test_tuned_choice_matches_reference():
    g, x, w = _inputs(64, 320, 256, torch.bfloat16, 5)
    kw = dict(norm_weight=(1 + 0.1 * torch.randn(256, generator=g)).to(DEVICE, torch.bfloat16), eps=1e-5, glu=True)
    torch.testing.assert_close(decode_gemm.decode_linear(x, w, **kw).float(),
                               decode_gemm.reference(x, w, **kw).float(), atol=3e-2, rtol=2e-2)


def test_refuses_what_it_does_not_handle():
    _, x, w = _inputs(decode_gemm.MAX_ROWS + 1, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="rows"):
        decode_gemm.decode_linear(x, w)
    _, x, w = _inputs(2, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="residual"):
        decode_gemm.decode_linear(x, w, residual=torch.zeros(2, 4, device=DEVICE))


@pytest.mark.parametrize("window", [None, 6])
def test_fused_decode_steps_match_the_layer_code(window):
    """A model built as the executor builds it (flat buffer: q/k/v and gate/up back to back) decodes the same
    logits and cache with its blocks and head as fused kernels as with the ordinary layer code."""
    from executor.comm import Group
    from reallm.parallel import ParallelModel
    from reallm.parallel.groups import ParallelGroups
    from reallm.placement import Placement
    from reallm.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4,
                     num_kv_heads=2, head_dim=16, vocab_size=101, source="tiny")
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))
    pm = ParallelModel.build(None, groups, spec=spec, dtype=dtype, device=DEVICE, init_seed=3)
    model = pm.model
    for layer in model.model.layers.values():  # as a sliding-window (Mistral-style) checkpoint sets it
        layer.self_attn.sliding_window = window
    B, P = 3, 9
    tokens = torch.randint(0, spec.vocab_size, (B * P,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cu = torch.arange(0, B * P + 1, P, dtype=torch.int32, device=DEVICE)
    out = {}
    for fused in (False, True):
        model.use_fused_decode = fused
        cache = model.new_kv_cache(B, P + 4)
        with torch.no_grad():
            model(tokens, cu, kv_cache=cache, select_rows=(cu[1:] - 1).long())
            x = tokens[cu[1:].long() - 1]
            pos = torch.full((B,), P, device=DEVICE)
            assert model.fused_decode_usable(model.model.embed_tokens(x)) == fused
            steps = []
            for t in range(3):
                logits = model.decode(x, pos + t, cache)
                steps.append(logits.float())
                x = logits.argmax(-1)
        out[fused] = (steps, cache)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for a, b in zip(out[False][0], out[True][0]):
        torch.testing.assert_close(b, a, **tol)
    for layer in out[False][1].k:
        torch.testing.assert_close(out[True][1].k[layer].float(), out[False][1].k[layer].float(), **tol)
        torch.testing.assert_close(out[True][1].v[layer].float(), out[False][1].v[layer].float(), **tol)
