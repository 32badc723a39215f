"""PADDED packed causal attention (one SDPA call on the zero-padded batch) equals the per-sequence SDPA loop,
forward and backward, and AUTO picks it on CPU only where it pays off (``reallm.model.attention``)."""

from __future__ import annotations

import pytest
import torch

from reallm.model.attention import (
    AttnBackend,
    PackedSeqs,
    packed_causal_attention,
    padded_attention,
    padded_pays_off,
    sdpa_loop_attention,
)

#: (atol, rtol) for outputs and for input gradients, per dtype.
TOL = {torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)), torch.bfloat16: ((2e-2, 2e-2), (5e-2, 5e-2))}

LENGTHS = {
    "ragged": [5, 1, 17, 3, 1, 12],
    "length_1_only": [1, 1, 1],
    "single": [9],
    "equal": [7, 7, 7, 7],
    "empty_inside": [4, 0, 6],
}


def _packed(lengths, num_heads: int, num_kv_heads: int, head_dim: int, dtype, seed: int = 0):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, n, head_dim, generator=g).to(dtype).requires_grad_(True)
               for n in (num_heads, num_kv_heads, num_kv_heads))
    w = torch.randn(T, num_heads, head_dim, generator=g)  # a random cotangent: every output row matters
    return PackedSeqs.from_cu_seqlens(cu), q, k, v, w


def _out_and_grads(fn, seqs, q, k, v, w):
    o = fn(q, k, v, seqs)
    (o.float() * w).sum().backward()
    grads = [t.grad.float().clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return o.float().detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_padded_equals_sdpa_loop_forward_and_backward(dtype, num_kv_heads, window, lengths):
    seqs, q, k, v, w = _packed(lengths, 4, num_kv_heads, 16, dtype)
    scale = 16 ** -0.5
    got = _out_and_grads(lambda q, k, v, s: padded_attention(q, k, v, s, scale, window), seqs, q, k, v, w)
    ref = _out_and_grads(lambda q, k, v, s: sdpa_loop_attention(q, k, v, s, scale, window), seqs, q, k, v, w)
    (o_atol, o_rtol), (g_atol, g_rtol) = TOL[dtype]
    torch.testing.assert_close(got[0], ref[0], atol=o_atol, rtol=o_rtol)
    for name, a, b in zip("qkv", got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=g_atol, rtol=g_rtol, msg=lambda m, name=name: f"d{name}: {m}")
    assert got[0].isfinite().all() and all(g.isfinite().all() for g in got[1])


def test_padded_through_the_dispatcher_and_a_larger_max_seqlen():
    """``packed_causal_attention(backend=PADDED)`` is the same function; a caller's ``max_seqlen`` above the
    longest sequence (allowed by ``PackedSeqs``) does not change the padded length."""
    lengths = [3, 8, 1]
    seqs, q, k, v, _ = _packed(lengths, 4, 2, 16, torch.float32)
    loose = PackedSeqs.from_cu_seqlens(seqs.cu_seqlens, max_seqlen=64)
    assert loose.padded_slots[0] == 8
    with torch.no_grad():
        ref = sdpa_loop_attention(q, k, v, seqs, 0.25)
        for s in (seqs, loose):
            got = packed_causal_attention(q, k, v, s, 0.25, backend=AttnBackend.PADDED)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_padded_slots_place_each_token_at_its_sequence_row_and_position():
    seqs = PackedSeqs.from_cu_seqlens(torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32))
    S, slot = seqs.padded_slots
    assert S == 3
    # sequence 0 -> rows 0, 1; sequence 1 empty; sequence 2 -> 6, 7, 8; sequence 3 -> 9
    assert slot.tolist() == [0, 1, 6, 7, 8, 9]
    assert seqs.padded_extra_pairs == 4 * 9 - (4 + 0 + 9 + 1)


def _seqs(lengths) -> PackedSeqs:
    return PackedSeqs.from_cu_seqlens(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()],
                                                   dtype=torch.int32))


def test_auto_picks_padded_on_cpu_for_many_short_sequences_only():
    q_tiny = torch.empty(0, 4, 16)  # the tiny models: 4 query heads of 16
    q_wide = torch.empty(0, 8, 64)
    rw_batch = _seqs([11, 12, 13, 14, 15, 16] * 11)  # ~64 short answers, as an RW or SFT micro-batch
    assert padded_pays_off(q_tiny, rw_batch) and padded_pays_off(q_wide, rw_batch)
    assert not padded_pays_off(q_tiny, _seqs([30]))  # one sequence: the loop's single call
    assert not padded_pays_off(q_tiny, _seqs([300] + [10] * 20))  # one long sequence among short ones
    assert not padded_pays_off(q_wide, _seqs([256, 128, 200, 160]))  # few long ragged sequences
    assert padded_pays_off(q_wide, _seqs([256] * 4))  # equal lengths: no padding at all
    if torch.cuda.is_available():
        assert not padded_pays_off(q_tiny.cuda(), rw_batch)  # CUDA keeps VARLEN / BATCHED / the loop


def test_auto_on_cpu_equals_the_loop_in_a_model_forward_and_backward(tiny_assets):
    """The tiny llama (GQA) on an RW-like batch: AUTO (PADDED here) and SDPA_LOOP give the same logits and
    parameter gradients."""
    from reallm.model import load_hf_model, pack_sequences

    model = load_hf_model(tiny_assets["llama"])
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 24, (32,), generator=g)]
    tokens, cu = pack_sequences([torch.randint(4, 300, (n,), generator=g).tolist() for n in lengths])
    layer0 = next(iter(model.model.layers.values()))
    assert padded_pays_off(torch.empty(0, 4, layer0.self_attn.head_dim), _seqs(lengths))
    results = []
    for backend in (AttnBackend.AUTO, AttnBackend.SDPA_LOOP):
        for layer in model.model.layers.values():
            layer.self_attn.backend = backend
        model.zero_grad()
        logits = model(tokens, cu)
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for n, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
