"""The persistent decode-product kernel (reallm/kernels/decode_stream.py) against its torch definition."""

import pytest
import torch

from reallm.kernels import decode_stream
from reallm.kernels.decode_stream import (
    ROWS,
    StreamProgram,
    chunked_buffer,
    from_chunks,
    pack_weight,
    schedule,
    stream_cache,
    to_chunks,
)


def _chain(device, layers=2, hidden=256, inter=384, vocab=512):
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
        q = prog.add(w(hidden + 256, hidden), x, qkv, dep=dep)
        o_i = prog.add(w(hidden, hidden), qkv, o, dep=q)
        g_i = prog.add(w(2 * inter, hidden), o, act, out="swiglu", dep=o_i)
        dep = prog.add(w(hidden, inter), act, down, dep=g_i)
        x = down
    prog.add(w(vocab, hidden), x, torch.zeros(ROWS, vocab, device=device, dtype=torch.bfloat16), dep=dep)
    return prog


def test_chunked_layouts_round_trip_and_swizzle():
    a = torch.randn(ROWS, 384).to(torch.bfloat16)
    buf = to_chunks(a)
    assert torch.equal(from_chunks(buf, 384), a) and torch.equal(from_chunks(buf, 200), a[:, :200])
    chunk1 = buf[ROWS * 128:2 * ROWS * 128].view(2, ROWS, 8, 8)  # [64-column block, row, unit, 8]
    assert torch.equal(chunk1[0, 3, 5 ^ 3], a[3, 128 + 40:128 + 48])  # row 3, unit 5 sits at unit 5 ^ 3
    assert torch.equal(chunk1[1, 6, 2 ^ 6], a[6, 128 + 64 + 16:128 + 64 + 24])
    w = torch.randn(512, 256).to(torch.bfloat16)
    packed = pack_weight(w).view(4, 2, 2, 2, 64, 8, 8)  # [tile, chunk, half, block, row, unit, 8]
    assert torch.equal(packed[2, 1, 1, 0, 9, 4 ^ 1], w[256 + 64 + 9, 128 + 32:128 + 40])
    assert torch.equal(packed[2, 1, 1, 1, 9, 4 ^ 1], w[256 + 64 + 9, 128 + 96:128 + 104])
    glu = pack_weight(w, glu=True).view(4, 2, 2, 2, 64, 8, 8)  # half h: gate rows 32h.., then up rows 256 + 32h..
    assert torch.equal(glu[0, 0, 1, 0, 0, 0], w[32, :8]) and torch.equal(glu[0, 0, 1, 0, 32, 0], w[256 + 32, :8])
    assert torch.equal(glu[1, 1, 0, 0, 5, 3 ^ 5], w[64 + 5, 128 + 24:128 + 32])
    assert torch.equal(glu[1, 1, 0, 1, 5, 1 ^ 5], w[64 + 5, 128 + 72:128 + 80])


@pytest.mark.parametrize("grid", [1, 3, 7, 132])
def test_schedule_covers_every_unit_once_and_balances_the_ctas(grid):
    shapes = [(20, 16), (16, 16), (88, 16), (16, 44), (3, 5), (250, 16)]
    lists, slots = schedule(shapes, grid)
    running = torch.zeros(grid, dtype=torch.float64)
    for p, (tiles, chunks) in enumerate(shapes):
        covered = torch.zeros(tiles, chunks, dtype=torch.int64)
        for c, segs in enumerate(lists):
            mine = [s for s in segs if s.p == p]
            running[c] += sum(s.c1 - s.c0 for s in mine)
            for s in mine:
                covered[s.tile, s.c0:s.c1] += 1
        assert torch.equal(covered, torch.ones_like(covered)), f"product {p}: a unit run twice or never"
        # every CTA's running total stays within a chunk of its share of the program so far
        exact = sum(t * k for t, k in shapes[:p + 1]) / grid
        assert (running - exact).abs().max() <= 1.0 + 1e-9, f"product {p}: {(running - exact).abs().max()}"
        # a spread tile has one sums tile; its chunk-0 piece finishes it, ends its CTA's range and waits for
        # the tile's other pieces
        spread = sorted({s.tile for segs in lists for s in segs if s.p == p and s.slot >= 0})
        assert slots[p] == len(spread)
        for tile in range(tiles):
            segs = [s for cta_segs in lists for s in cta_segs if s.p == p and s.tile == tile]
            final = [s for s in segs if s.slot == -1]
            assert len(final) == 1 and final[0].c0 == 0
            if len(segs) == 1:
                assert final[0].nslots == 0 and final[0].c1 == chunks
            else:
                assert final[0].nslots == len(segs) - 1
                assert {s.slot for s in segs if s.slot >= 0} == {final[0].slot0} and final[0].slot0 < slots[p]
                cta = next(c for c, cta_segs in enumerate(lists) if final[0] in cta_segs)
                assert [s for s in lists[cta] if s.p == p][-1] == final[0]
        assert len({s.slot0 for cta_segs in lists for s in cta_segs if s.p == p and s.nslots}) == slots[p]
    for segs in lists:  # every CTA walks its segments in product order
        assert [s.p for s in segs] == sorted(s.p for s in segs)


def test_reference_is_the_chain_of_products():
    prog = _chain("cpu")
    prog.reference()
    x0 = from_chunks(prog.products[0].x, 256).float()
    torch.testing.assert_close(prog.output(0).float(),
                               (x0 @ prog.products[0].w.float().t()).to(torch.bfloat16).float())
    gu = from_chunks(prog.products[1].y, 256).float() @ prog.products[2].w.float().t()
    act = torch.nn.functional.silu(gu[:, :384]) * gu[:, 384:]
    torch.testing.assert_close(prog.output(2).float(), act.to(torch.bfloat16).float())
    assert prog.shapes() == [(4, 2), (2, 2), (6, 2), (2, 3)] * 2 + [(4, 2)]
    assert prog.output(len(prog.products) - 1).abs().sum() > 0


def test_program_rejects_bad_products():
    prog = StreamProgram()
    w = torch.zeros(128, 128, dtype=torch.bfloat16)
    x = chunked_buffer(128, "cpu")
    y = chunked_buffer(128, "cpu")
    with pytest.raises(ValueError, match="multiple of 128 and K of 128"):
        prog.add(torch.zeros(64, 128, dtype=torch.bfloat16), x, y)
    with pytest.raises(ValueError, match="needs whole chunks: 64 columns"):
        prog.add(w, x, y, out="swiglu")
    with pytest.raises(ValueError, match="chunked buffer"):
        prog.add(w, torch.zeros(ROWS, 128, dtype=torch.bfloat16), y)
    with pytest.raises(ValueError, match="y rows must be"):
        prog.add(w, x, torch.zeros(8, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="earlier product"):
        prog.add(w, x, y, dep=0)
    assert prog.add(w, x, y) == 0
    with pytest.raises(ValueError, match="product 0's chunked output"):
        prog.add(w, x, y, dep=0)


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the kernel needs an sm_90 CUDA GPU")


@needs_sm90
@pytest.mark.parametrize("grid,size,variant,inflight", [(None, 1, 0, 1), (None, 1, 1, 0), (3, 1, 0, 1), (1, 1, 1, 2),
                                                        (7, 2, 0, 0), (None, 4, 0, 1), (None, 4, 1, 0),
                                                        (None, 4, 1, 2), (None, 1, 1, 4), (3, 2, 2, 1),
                                                        (None, 4, 2, 1)])
def test_kernel_matches_the_reference_and_replays(grid, size, variant, inflight):
    """Few CTAs (grid 1, 3, 7) give each many segments: the rings wrap and tiles split over CTAs at odd
    chunk boundaries; a wider chain (size 4) keeps consecutive products in flight together on every SM."""
    assert decode_stream.available(verbose=True), decode_stream._EXT.error
    prog = _chain("cuda", layers=2 + size, hidden=256 * size, inter=384 * size, vocab=512 * size)
    for launch in range(3):  # the counters and tickets must be back to zero after every launch
        for p in prog.products:
            p.y.zero_()
        prog.run(grid=grid, variant=variant, max_inflight=inflight)
        torch.cuda.synchronize()
        for i in range(len(prog.products)):  # each product against torch on the kernel's own input
            torch.testing.assert_close(prog.output(i).float(), prog.reference_output(i).float(), rtol=2e-2,
                                       atol=2e-2, msg=lambda m, i=i, launch=launch: f"launch {launch}, product {i}: {m}")


@needs_sm90
def test_pack_many_is_bitwise_the_torch_fold_and_pack():
    """One launch packs stacked sources ([Wq; Wk; Wv], [Wg; Wu]) with a folded norm weight, and plain
    matrices, exactly as the torch fold and ``pack_weight`` do; a job that does not fit is refused."""
    assert decode_stream.available(), "decode_stream kernel did not build"
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    q, k, v, gamma = rnd(256, 384), rnd(128, 384), rnd(128, 384), rnd(384) + 1
    gate, up, gamma2 = rnd(256, 256), rnd(256, 256), rnd(256) + 1
    plain = rnd(128, 512)
    wide, wide_gamma = rnd(1024, 2048), rnd(2048) + 1  # more 16-byte units than the grid has threads
    jobs = [([q, k, v], gamma, False), ([gate, up], gamma2, True), ([plain], None, False), ([wide], wide_gamma, False),
            ([gate, up], None, True)]
    want = []
    for srcs, gam, glu in jobs:
        mat = torch.cat(srcs)
        if gam is not None:
            mat = (mat.float() * gam.float()[None, :]).to(torch.bfloat16)
        want.append(pack_weight(mat, glu=glu))
    dsts = [torch.full_like(w, 7.0) for w in want]
    assert decode_stream.pack_many([(d, s, gam, glu) for d, (s, gam, glu) in zip(dsts, jobs)])
    for d, w in zip(dsts, want):
        assert torch.equal(d, w)
    assert not decode_stream.pack_many([(dsts[2], [plain.float()], None, False)])  # fp32 source: torch's job
    odd = torch.empty(128 * 512 + 1, dtype=torch.bfloat16, device="cuda")[1:]  # not 16-byte aligned
    assert not decode_stream.pack_many([(odd, [plain], None, False)])


@needs_sm90
def test_stream_caches_in_place_is_stream_cache():
    caches = [torch.randn(3, 2, 256, 64, generator=torch.Generator().manual_seed(i)).to("cuda", torch.bfloat16)
              for i in range(3)]
    assert hasattr(decode_stream._EXT.load(), "permute_caches")  # the launch, not the torch fallback
    want = [stream_cache(c) for c in caches]
    decode_stream.stream_caches_in_place(caches)
    for c, w in zip(caches, want):
        assert torch.equal(c, w)
    decode_stream.stream_caches_in_place(caches)  # an involution: back to plain
    assert torch.equal(caches[1], stream_cache(want[1]))
