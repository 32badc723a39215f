"""The Triton append-and-attend decode kernel against the masked-SDPA reference.

Runs wherever Triton is importable: on CUDA for real, on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported); skipped otherwise.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from reallm.kernels.decode_attention import decode_attention_append  # noqa: E402
from reallm.model.attention import decode_attention  # noqa: E402
from reallm.model.transformer import KVCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu":
    # The interpreter keeps scalars as 1-element arrays and converts loop bounds with int(array), which
    # numpy >= 2.4 refuses for 1-d arrays; convert through the single element instead.
    import triton.runtime.interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def reference(q, kn, vn, kc, vc, pos, scale, window):
    kc, vc = kc.clone(), vc.clone()
    cache = KVCache({0: kc}, {0: vc})
    rows = torch.arange(q.shape[0])
    cache.write(0, kn, vn, rows, pos)
    return decode_attention(q, kc, vc, cache.valid_mask(pos, window), scale), kc, vc


@pytest.mark.parametrize("B,H,Hkv,D,S,window", [(3, 8, 2, 16, 40, None), (2, 4, 4, 32, 70, None),
                                                 (4, 6, 2, 16, 33, 5), (1, 2, 1, 64, 129, None),
                                                 (1, 8, 4, 32, 20, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(B, H, Hkv, D, S, window, dtype):
    g = torch.Generator().manual_seed(B * 100 + S)
    q = torch.randn(B, H, D, generator=g).to(DEVICE, dtype)
    kn = torch.randn(B, Hkv, D, generator=g).to(DEVICE, dtype)
    # v_new as a strided view (as from one fused q/k/v product): its layout differs from k_new's
    vn = torch.randn(B, Hkv, 2 * D, generator=g).to(DEVICE, dtype)[..., :D]
    kc = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype)
    # Positions 0 (empty cache), 1, mid and last slot; one per sequence.
    pos = torch.tensor([0, 1, S // 2, S - 1][:B] if B > 1 else [S - 1], device=DEVICE)
    scale = D ** -0.5
    want, want_k, want_v = reference(q.float(), kn.float(), vn.float(), kc.float(), vc.float(), pos, scale, window)
    got = decode_attention_append(q, kn, vn, kc, vc, pos, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # The append wrote exactly the new rows; everything else is untouched.
    torch.testing.assert_close(kc.float(), want_k, atol=0, rtol=0)
    torch.testing.assert_close(vc.float(), want_v, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_in_the_kernel_matches_apply_rope(dtype):
    """``rope=(cos, sin)``: q and the new key are rotated in the kernel, as ``apply_rope`` rotates them."""
    from reallm.model.transformer import apply_rope

    B, H, Hkv, D, S = 3, 8, 2, 32, 50
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(DEVICE, dtype)  # one fused product's output
    q, kn, vn = (t.view(B, -1, D) for t in qkv.split((H * D, Hkv * D, Hkv * D), dim=-1))
    kc = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype)
    pos = torch.tensor([0, 17, S - 1], device=DEVICE)
    freqs = pos.float()[:, None] * (1e4 ** (-torch.arange(0, D, 2, device=DEVICE).float() / D))[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    qr, kr = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(kn.float(), cos.float(), sin.float())
    want, want_k, want_v = reference(qr, kr, vn.float(), kc.float(), vc.float(), pos, D ** -0.5, None)
    got = decode_attention_append(q, kn, vn, kc, vc, pos, D ** -0.5, rope=(cos, sin))
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(kc.float(), want_k, atol=tol, rtol=tol)
    torch.testing.assert_close(vc.float(), want_v, atol=0, rtol=0)
