"""The persistent decode-product kernel (reallm/kernels/decode_stream.py) against its torch definition."""

import pytest
import torch

from reallm.kernels import decode_stream
from reallm.kernels.decode_stream import ROWS, StreamProgram


def _chain(device, bn, splits, layers=2, hidden=256, inter=384, vocab=512):
    """A small block chain (qkv → o → gate/up → SwiGLU → down, then a head) wired like a decode step."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, generator=g) / k ** 0.5).to(device, torch.bfloat16)

    def buf(n):
        return torch.zeros(ROWS, n, device=device, dtype=torch.bfloat16)

    prog = StreamProgram(bn)
    x = torch.randn(ROWS, hidden, generator=g).to(device, torch.bfloat16)
    dep = None
    for _ in range(layers):
        qkv, o, gu, down = buf(hidden + 2 * 128), buf(hidden), buf(2 * inter), buf(hidden)
        q = prog.add(w(hidden + 2 * 128, hidden), x, qkv, split=splits[0], dep=dep)
        o_i = prog.add(w(hidden, hidden), qkv[:, :hidden], o, split=splits[1], dep=q)
        g_i = prog.add(w(2 * inter, hidden), o, gu, split=splits[2], dep=o_i)
        dep = prog.add(w(hidden, inter), gu, down, mode="swiglu", split=splits[3], dep=g_i)
        x = down
    prog.add(w(vocab, hidden), x, buf(vocab), split=splits[4], dep=dep)
    return prog


def test_reference_is_the_chain_of_products():
    prog = _chain("cpu", 64, (1, 1, 1, 1, 1))
    prog.reference()
    p0 = prog.products[0]
    torch.testing.assert_close(p0.y.float(), (p0.x.float() @ p0.w.float().t()).to(torch.bfloat16).float())
    down = prog.products[3]
    k = down.w.shape[1]
    act = (torch.nn.functional.silu(down.x[:, :k].float()) * down.x[:, k:].float()).to(torch.bfloat16).float()
    torch.testing.assert_close(down.y.float(), (act @ down.w.float().t()).to(torch.bfloat16).float())
    assert prog.tasks() == [8, 4, 12, 4] * 2 + [8]
    assert prog.products[-1].y.abs().sum() > 0


def test_program_rejects_bad_products():
    prog = StreamProgram(64)
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    x = torch.zeros(ROWS, 128, dtype=torch.bfloat16)
    y = torch.zeros(ROWS, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64 and K of split"):
        prog.add(w, x, y, split=2)
    with pytest.raises(ValueError, match="x needs 256 columns"):
        prog.add(w, x, y, mode="swiglu")
    with pytest.raises(ValueError, match="64 rows"):
        prog.add(w, x[:8], y)
    with pytest.raises(ValueError, match="earlier product"):
        prog.add(w, x, y, dep=0)
    with pytest.raises(ValueError, match="bn must be"):
        StreamProgram(32)
    assert prog.add(w, x, y) == 0


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the kernel needs an sm_90 CUDA GPU")


@needs_sm90
@pytest.mark.parametrize("bn,splits", [(64, (1, 1, 1, 1, 1)), (64, (2, 2, 1, 3, 2)), (128, (2, 4, 1, 1, 2))])
def test_kernel_matches_the_reference_and_replays(bn, splits):
    assert decode_stream.available(verbose=True), decode_stream._EXT.error
    prog = _chain("cuda", bn, splits)
    ref = _chain("cuda", bn, splits)
    ref.reference()
    for launch in range(3):  # the counters and tickets must be back to zero after every launch
        for p in prog.products:
            p.y.zero_()
        prog.run()
        torch.cuda.synchronize()
        for i, (p, r) in enumerate(zip(prog.products, ref.products)):
            torch.testing.assert_close(p.y.float(), r.y.float(), rtol=2e-2, atol=2e-2,
                                       msg=lambda m, i=i: f"launch {launch}, product {i}: {m}")
