"""The persistent decode-product kernel (reallm/kernels/decode_stream.py) against its torch definition."""

import pytest
import torch

from reallm.kernels import decode_stream
from reallm.kernels.decode_stream import ROWS, StreamProgram, chunked_buffer, from_chunks, pack_weight, to_chunks


def _chain(device, splits, layers=2, hidden=256, inter=384, vocab=512):
    """A small block chain (qkv → o → gate/up + SwiGLU → down, then a head) wired like a decode step."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, generator=g) / k ** 0.5).to(device, torch.bfloat16)

    prog = StreamProgram()
    x = chunked_buffer(hidden, device)
    x.copy_(to_chunks(torch.randn(ROWS, hidden, generator=g).to(device, torch.bfloat16)))
    dep = None
    for _ in range(layers):
        qkv, o, act, down = (chunked_buffer(c, device) for c in (hidden + 256, hidden, inter, hidden))
        q = prog.add(w(hidden + 256, hidden), x, qkv, split=splits[0], dep=dep)
        o_i = prog.add(w(hidden, hidden), qkv, o, split=splits[1], dep=q)
        g_i = prog.add(w(2 * inter, hidden), o, act, out="swiglu", split=splits[2], dep=o_i)
        dep = prog.add(w(hidden, inter), act, down, split=splits[3], dep=g_i)
        x = down
    prog.add(w(vocab, hidden), x, torch.zeros(ROWS, vocab, device=device, dtype=torch.bfloat16),
             split=splits[4], dep=dep)
    return prog


def test_chunked_layouts_round_trip_and_swizzle():
    a = torch.randn(ROWS, 384).to(torch.bfloat16)
    buf = to_chunks(a)
    assert torch.equal(from_chunks(buf, 384), a) and torch.equal(from_chunks(buf, 200), a[:, :200])
    chunk1 = buf[ROWS * 128:2 * ROWS * 128].view(ROWS, 16, 8)
    assert torch.equal(chunk1[3, 5 ^ 3], a[3, 128 + 40:128 + 48])  # row 3, unit 5 sits at unit 5 ^ 3
    w = torch.randn(256, 256).to(torch.bfloat16)
    packed = pack_weight(w).view(4, 2, 64, 16, 8)  # [tile, chunk, row, unit, 8]
    assert torch.equal(packed[2, 1, 9, 4 ^ 1], w[128 + 9, 128 + 32:128 + 40])
    glu = pack_weight(w, glu=True).view(4, 2, 64, 16, 8)
    assert torch.equal(glu[1, 0, 0, 0], w[32, :8]) and torch.equal(glu[1, 0, 32, 0], w[128 + 32, :8])


def test_reference_is_the_chain_of_products():
    prog = _chain("cpu", (1, 1, 1, 1, 1))
    prog.reference()
    x0 = from_chunks(prog.products[0].x, 256).float()
    torch.testing.assert_close(prog.output(0).float(),
                               (x0 @ prog.products[0].w.float().t()).to(torch.bfloat16).float())
    gu = from_chunks(prog.products[1].y, 256).float() @ prog.products[2].w.float().t()
    act = torch.nn.functional.silu(gu[:, :384]) * gu[:, 384:]
    torch.testing.assert_close(prog.output(2).float(), act.to(torch.bfloat16).float())
    assert prog.tasks() == [8, 4, 12, 4] * 2 + [8]
    assert prog.output(len(prog.products) - 1).abs().sum() > 0


def test_program_rejects_bad_products():
    prog = StreamProgram()
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    x = chunked_buffer(128, "cpu")
    y = chunked_buffer(64, "cpu")
    with pytest.raises(ValueError, match="multiple of 64 and K of split"):
        prog.add(w, x, y, split=2)
    with pytest.raises(ValueError, match="multiple of 128"):
        prog.add(w, x, y, out="swiglu")
    with pytest.raises(ValueError, match="chunked buffer"):
        prog.add(w, torch.zeros(ROWS, 128, dtype=torch.bfloat16), y)
    with pytest.raises(ValueError, match="y rows must be"):
        prog.add(w, x, torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="earlier product"):
        prog.add(w, x, y, dep=0)
    assert prog.add(w, x, y) == 0
    with pytest.raises(ValueError, match="product 0's chunked output"):
        prog.add(w, x, y, dep=0)


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the kernel needs an sm_90 CUDA GPU")


@needs_sm90
@pytest.mark.parametrize("splits,grid,size", [((1, 1, 1, 1, 1), None, 1), ((2, 2, 1, 3, 2), None, 1),
                                              ((1, 2, 2, 1, 1), 3, 1), ((2, 2, 1, 3, 2), 1, 1),
                                              ((2, 4, 2, 3, 2), None, 4)])
def test_kernel_matches_the_reference_and_replays(splits, grid, size):
    """Few CTAs (grid 1, 3) give each many tasks: the rings wrap, both consumer groups and every wait run;
    a wider chain (size 4) keeps consecutive split products in flight together on every SM."""
    assert decode_stream.available(verbose=True), decode_stream._EXT.error
    prog = _chain("cuda", splits, layers=2 + size, hidden=256 * size, inter=384 * size, vocab=512 * size)
    for launch in range(3):  # the counters and tickets must be back to zero after every launch
        for p in prog.products:
            p.y.zero_()
        prog.run(grid=grid)
        torch.cuda.synchronize()
        for i in range(len(prog.products)):  # each product against torch on the kernel's own input
            torch.testing.assert_close(prog.output(i).float(), prog.reference_output(i).float(), rtol=2e-2,
                                       atol=2e-2, msg=lambda m, i=i: f"launch {launch}, product {i}: {m}")
