"""A decode step's matrix products as one persistent, weight-streaming kernel (``csrc/cuda/decode_stream.cu``).

A :class:`StreamProgram` is a static list of products ``y = x @ W^T`` over 64 rows, each reading the
output of an earlier product; ``run`` executes all of them in one launch. Inside, every SM streams its
share of every product's weights into shared memory ahead of the activations, so the memory system does
not idle at product boundaries (the reason a chain of library GEMMs reads a decode step's weights at 2/3
of copy bandwidth). A product may end in SwiGLU: ``out="swiglu"`` takes W = [gate; up] (2I rows) and
writes ``silu(gate) * up`` (I columns), from the fp32 sums.

Work is split stream-K style (:func:`schedule`): each product's (128-row tile, 128-column chunk) units are
cut into one equal contiguous range per SM, so every SM reads the same bytes of every product; tiles
spread over several SMs are summed through fp32 partial slots.

Layouts: weights are packed once (:func:`pack_weight`) and activations live in *chunked* buffers
(:func:`chunked_buffer`, :func:`to_chunks`, :func:`from_chunks`): 64 × 128 blocks, each one contiguous
16 KB copy into shared memory, swizzled so that the tensor-core loads hit distinct banks. A product's
output is chunked (the next product's input) or plain rows (``y`` a [64, N] view).

:meth:`StreamProgram.reference` runs the same program with torch (fp32 products of the bf16 inputs, one
rounding of each output): the definition the kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from reallm.kernels.jit import JitExtension

# wgmma needs the architecture-specific target (sm_90a), which torch's default arch flags do not give
_EXT = JitExtension("reallm_decode_stream_v39", "decode_stream.cu",
                    cuda_flags=("-gencode=arch=compute_90a,code=sm_90a",))
#: Rows (sequences) of a step the kernel computes (``kM``); weight rows per tile (``kTile``), per consumer
#: half (``kHalf``); chunk columns (``kBK``).
ROWS, TILE, HALF, CHUNK = 64, 128, 64, 128
#: Program row layout (``csrc/cuda/decode_stream.cu``, ``F_*``; 16 int64 per row).
_FIELDS = ("w", "x", "y", "partial", "tickets", "N", "K", "y_stride", "out", "y_layout", "ready_in", "need",
           "ready_out")
_OUTS = {"plain": 0, "swiglu": 1}
#: Floats of one sums tile (a weight tile's fp32 sums over the 64 rows).
_SLOT_FLOATS = TILE * ROWS
#: Ring shapes (weight × input slots) the kernel is built with, by ``variant``.
VARIANTS = {0: (6, 2), 1: (5, 3), 2: (5, 2)}


class Segment(NamedTuple):
    """Chunks [c0, c1) of one weight tile of product p, run by one CTA. A tile spread over several segments
    owns a sums tile of the product (fp32): its pieces add their partials into sums tile ``slot``, and its
    piece from chunk 0 (the *finalizer*: ``slot`` −1) waits for those ``nslots`` pieces, adds sums tile
    ``slot0`` to its own and writes the output. A whole tile: ``slot`` −1, ``nslots`` 0."""
    p: int
    tile: int
    c0: int
    c1: int
    slot: int
    slot0: int
    nslots: int


def schedule(shapes: list[tuple[int, int]], grid: int) -> tuple[list[list[Segment]], list[int]]:
    """Stream-K split of products of (tiles, chunks per tile) over ``grid`` CTAs.

    Each product's units (tile-major) are cut into ``grid`` contiguous ranges, rounded so that every CTA's
    running total over the program stays within one unit of an equal share: CTAs stream without pausing,
    so the running totals set when each one reaches a product boundary. (Shares scaled to per-SM rates
    measured with the weight streams alone — SMs differ by up to 25 %, the same SMs every launch — did
    not shorten the dependent chain: BENCHMARKS.md, session 9.) A range becomes one segment per tile it
    touches; a spread tile's chunk-0 piece ends its CTA's range, so it runs last among the tile's pieces
    and finishes the tile. Returns every CTA's segments (in product order) and the sums tiles each product
    needs.
    """
    lists: list[list[Segment]] = [[] for _ in range(grid)]
    slots = []
    done = [0] * grid       # units each CTA has been given so far
    exact = [0.0] * grid    # its exact share so far
    for p, (tiles, chunks) in enumerate(shapes):
        units = tiles * chunks
        counts, total, target = [], 0, 0.0
        for cta in range(grid):  # cumulative rounding of (exact share to date − units to date)
            exact[cta] += units / grid
            target += exact[cta] - done[cta]
            upto = min(units, max(total, round(target)))
            counts.append(upto - total)
            total = upto
        counts[-1] += units - total
        pieces: dict[int, list[tuple[int, int, int]]] = {}  # tile -> (cta, c0, c1) in chunk order
        order = []  # (cta, tile, c0, c1) in unit order
        u = 0
        for cta, count in enumerate(counts):
            done[cta] += count
            end = u + count
            while u < end:
                tile, c0 = divmod(u, chunks)
                c1 = min(chunks, c0 + end - u)
                pieces.setdefault(tile, []).append((cta, c0, c1))
                order.append((cta, tile, c0, c1))
                u += c1 - c0
        sums = {}  # spread tile -> its sums tile
        for tile, group in pieces.items():
            if len(group) > 1:
                sums[tile] = len(sums)
        for cta, tile, c0, c1 in order:
            if tile not in sums:
                lists[cta].append(Segment(p, tile, c0, c1, -1, -1, 0))
            elif c0 == 0:
                lists[cta].append(Segment(p, tile, c0, c1, -1, sums[tile], len(pieces[tile]) - 1))
            else:
                lists[cta].append(Segment(p, tile, c0, c1, sums[tile], -1, 0))
        slots.append(len(sums))
    return lists, slots


def available(verbose: bool = False) -> bool:
    return _EXT.load(verbose) is not None


def _swizzle_index(device) -> torch.Tensor:
    """[64, 8] unit permutation of a 64-column block: 16-byte unit u of row r is stored at u ^ (r % 8) (an
    involution; the 128-byte swizzle the tensor cores read shared memory with)."""
    r = torch.arange(ROWS, device=device)[:, None]
    u = torch.arange(8, device=device)[None, :]
    return u ^ (r % 8)


def to_chunks(a: torch.Tensor) -> torch.Tensor:
    """[64, C] → the chunked 1-D layout (C a multiple of 128)."""
    rows, cols = a.shape
    if rows != ROWS or cols % CHUNK:
        raise ValueError(f"to_chunks: need [{ROWS}, multiple of {CHUNK}], got {list(a.shape)}")
    units = a.reshape(ROWS, cols // CHUNK, 2, 8, 8).permute(1, 2, 0, 3, 4)  # [chunk, block, row, unit, 8]
    idx = _swizzle_index(a.device)[None, None, :, :, None].expand_as(units)
    return units.gather(3, idx).contiguous().view(-1)


def from_chunks(buf: torch.Tensor, cols: int) -> torch.Tensor:
    """The chunked layout → [64, cols]."""
    n = -(-cols // CHUNK)
    units = buf[:n * ROWS * CHUNK].view(n, 2, ROWS, 8, 8)
    idx = _swizzle_index(buf.device)[None, None, :, :, None].expand_as(units)
    return units.gather(3, idx).permute(2, 0, 1, 3, 4).reshape(ROWS, n * CHUNK)[:, :cols]


def chunked_buffer(cols: int, device, dtype=torch.bfloat16) -> torch.Tensor:
    """A zeroed chunked activation of [64, cols] (cols rounded up to 128)."""
    return torch.zeros(-(-cols // CHUNK) * ROWS * CHUNK, dtype=dtype, device=device)


def pack_weight(w: torch.Tensor, glu: bool = False) -> torch.Tensor:
    """W [N, K] → tiles of 128 rows × chunks of 128 columns, a chunk (one copy) = two 64-row halves, each two
    swizzled 64-column blocks like an activation chunk's.

    ``glu``: W is [gate; up]; each 64-row half of a tile gets 32 gate rows and then the 32 matching up rows.
    """
    n, k = w.shape
    if n % TILE or k % CHUNK:
        raise ValueError(f"pack_weight: N must be a multiple of {TILE} and K of {CHUNK}, got {list(w.shape)}")
    if glu:
        gate, up = w.view(2, n // HALF, HALF // 2, k).unbind(0)
        w = torch.cat([gate, up], dim=1).reshape(n, k)
    units = w.reshape(n // TILE, 2, HALF, k // CHUNK, 2, 8, 8).permute(0, 3, 1, 4, 2, 5, 6)
    idx = _swizzle_index(w.device)[None, None, None, None, :, :, None].expand_as(units)  # [tile, chunk, half, block, row, u, 8]
    return units.gather(5, idx).contiguous().view(-1)


@dataclass
class _Product:
    w: torch.Tensor        # the plain [N, K] matrix (the reference reads it)
    packed: torch.Tensor
    x: torch.Tensor        # chunked input
    y: torch.Tensor        # chunked output, or a [64, N'] row view
    out: str
    dep: int

    @property
    def out_cols(self) -> int:
        return self.w.shape[0] // 2 if self.out == "swiglu" else self.w.shape[0]


class StreamProgram:
    """Products to run in one launch, in dependency order."""

    def __init__(self):
        self.products: list[_Product] = []
        self._built: dict[int, dict] = {}

    def add(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, out: str = "plain",
            dep: Optional[int] = None) -> int:
        """Append ``y = x[:, :K] @ w.T`` (or its SwiGLU); returns the product's index.

        ``x``: a chunked buffer with at least K columns. ``y``: a chunked buffer, or a [64, ≥ N'] bf16 view
        with unit column stride (N' = N, or N / 2 for SwiGLU). ``dep``: the product whose output buffer ``x``
        is (None: ``x`` is ready before the launch); each input chunk is read once the dep's tiles writing it
        are done, and the kernel orders nothing else — give every product its own output buffer.
        """
        n, k = w.shape
        where = f"product {len(self.products)} (w {list(w.shape)})"
        if out not in _OUTS:
            raise ValueError(f"{where}: out must be one of {sorted(_OUTS)}, got {out!r}")
        if any(t.dtype != torch.bfloat16 for t in (w, x, y)):
            raise ValueError(f"{where}: w, x and y must be bfloat16")
        if n % TILE or k % CHUNK:
            raise ValueError(f"{where}: N must be a multiple of {TILE} and K of {CHUNK}")
        if x.dim() != 1 or x.numel() < k * ROWS or x.data_ptr() % 16:
            raise ValueError(f"{where}: x must be a chunked buffer (chunked_buffer) of at least {k} columns")
        cols = n // 2 if out == "swiglu" else n
        if y.dim() == 1:
            if cols % CHUNK:
                raise ValueError(f"{where}: a chunked output needs whole chunks: {cols} columns is not a multiple "
                                 f"of {CHUNK} (write rows instead, or pad N)")
            if y.numel() < cols * ROWS or y.data_ptr() % 16:
                raise ValueError(f"{where}: y must be a chunked buffer of at least {cols} columns")
        elif y.shape[0] != ROWS or y.shape[1] < cols or y.stride(1) != 1 or y.stride(0) % 8 or y.data_ptr() % 16:
            raise ValueError(f"{where}: y rows must be a [{ROWS}, ≥{cols}] view, unit column stride, 16-byte "
                             f"aligned rows; got {list(y.shape)} strides {y.stride()}")
        if dep is not None:
            if not 0 <= dep < len(self.products):
                raise ValueError(f"{where}: dep {dep} must name an earlier product")
            src = self.products[dep].y
            if src.dim() != 1 or src.data_ptr() != x.data_ptr():
                raise ValueError(f"{where}: x must be product {dep}'s chunked output buffer (dep={dep})")
        self.products.append(_Product(w, pack_weight(w, glu=out == "swiglu"), x, y, out, -1 if dep is None else dep))
        self._built = {}
        return len(self.products) - 1

    def shapes(self) -> list[tuple[int, int]]:
        """(tiles, chunks per tile) of every product: the units :func:`schedule` splits."""
        return [(p.w.shape[0] // TILE, p.w.shape[1] // CHUNK) for p in self.products]

    def _build(self, grid: int) -> dict:
        if grid in self._built:
            return self._built[grid]
        dev = self.products[0].w.device
        shapes = self.shapes()
        lists, slots = schedule(shapes, grid)
        tiles = [t for t, _ in shapes]
        # fp32 sums tiles of the spread tiles, a region per product (zeroed here, left zeroed by the kernel)
        partial = torch.zeros(max(sum(slots), 1) * _SLOT_FLOATS, dtype=torch.float32, device=dev)
        slot_at = [0] + torch.tensor(slots).cumsum(0).tolist()[:-1]
        tickets = torch.zeros(sum(tiles), dtype=torch.int32, device=dev)
        tick_at = [0] + torch.tensor(tiles).cumsum(0).tolist()[:-1]
        # readiness counters of every chunked output, one per 128-column chunk
        starts, n_counters = [], 0
        for p in self.products:
            starts.append(n_counters if p.y.dim() == 1 else None)
            n_counters += p.out_cols // CHUNK if p.y.dim() == 1 else 0
        counters = torch.zeros(max(n_counters, 1), dtype=torch.int32, device=dev)
        rows = []
        for i, p in enumerate(self.products):
            n, k = p.w.shape
            f = {"w": p.packed.data_ptr(), "x": p.x.data_ptr(), "y": p.y.data_ptr(),
                 "partial": partial.data_ptr() + 4 * _SLOT_FLOATS * slot_at[i],
                 "tickets": tickets.data_ptr() + 4 * tick_at[i], "N": n, "K": k,
                 "y_stride": p.y.stride(0) if p.y.dim() == 2 else 0, "out": _OUTS[p.out],
                 "y_layout": 0 if p.y.dim() == 1 else 1,
                 "ready_in": 0 if p.dep < 0 else counters.data_ptr() + 4 * starts[p.dep],
                 "need": 0 if p.dep < 0 else (2 if self.products[p.dep].out == "swiglu" else 1),
                 "ready_out": 0 if starts[i] is None else counters.data_ptr() + 4 * starts[i]}
            rows.append([f[name] for name in _FIELDS] + [0] * (16 - len(_FIELDS)))
        length = max(1, max(len(segs) for segs in lists))
        table = torch.zeros(grid, length, 8, dtype=torch.int32)
        for cta, segs in enumerate(lists):
            if segs:
                table[cta, :len(segs), :7] = torch.tensor(segs, dtype=torch.int32)
        self._built[grid] = {"prog": torch.tensor(rows, dtype=torch.int64, device=dev), "segs": table.to(dev),
                             "lens": torch.tensor([len(x) for x in lists], dtype=torch.int32, device=dev),
                             "lists": lists, "partial": partial, "tickets": tickets, "counters": counters,
                             "exit": torch.zeros(1, dtype=torch.int32, device=dev)}
        return self._built[grid]

    def grid(self, grid: Optional[int] = None) -> int:
        sms = torch.cuda.get_device_properties(self.products[0].w.device).multi_processor_count
        return min(grid or sms, sms)

    def segments(self, grid: Optional[int] = None) -> list[list[Segment]]:
        """Every CTA's segments at this grid (the rows of a trace)."""
        return self._build(self.grid(grid))["lists"]

    def run(self, grid: Optional[int] = None, flags: int = 0, trace: Optional[torch.Tensor] = None,
            variant: int = 0, max_inflight: int = 1) -> None:
        """Launch the kernel on the current stream (capturable in a CUDA graph after one eager run).

        ``flags`` are timing diagnostics (wrong results): 1 inputs do not wait for their products, 2 no
        arithmetic (3: the two streams alone). ``trace``: int64 [grid, segments, 8] to receive each segment's
        global timers (ns): consumers' start, first input chunk, end of products, end of epilogue; first
        weight copy issued; the other pieces' sums landed (a finalizer); first input copy issued; publication (csrc/cuda/decode_stream.cu). ``variant``:
        the ring shape, :data:`VARIANTS`. ``max_inflight``: weight copies (32 KB) an SM keeps in flight (0: as
        many as the ring has free slots). One is enough for full bandwidth (16 KB is not: its copies
        alone take 1070 µs), and more only lengthens every queue on the way to L2 — the readiness
        counters, partial sums and activation copies of the next product wait in the same queues
        (measured: 1153 µs with one, 1239 µs with two, 1262 µs unlimited).
        """
        ext = _EXT.load()
        if ext is None:
            raise RuntimeError(f"decode_stream kernel unavailable: {_EXT.error}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant}")
        grid = self.grid(grid)
        b = self._build(grid)
        ext.run(b["prog"], b["segs"], b["lens"], b["counters"], b["exit"], flags, trace, variant, max_inflight)

    def output(self, i: int) -> torch.Tensor:
        """Product ``i``'s output as [64, N']."""
        p = self.products[i]
        return from_chunks(p.y, p.out_cols) if p.y.dim() == 1 else p.y[:, :p.out_cols]

    def reference_output(self, i: int) -> torch.Tensor:
        """Product ``i`` in fp32 torch from its input buffer as it is now, rounded once to bf16."""
        p = self.products[i]
        k = p.w.shape[1]
        y = from_chunks(p.x, k).float() @ p.w.float().t()
        if p.out == "swiglu":
            g, u = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(g) * u
        return y.to(torch.bfloat16)

    def reference(self) -> None:
        """The whole program in torch, in order (the kernel's definition)."""
        for i, p in enumerate(self.products):
            y = self.reference_output(i)
            if p.y.dim() == 1:  # chunked outputs are whole chunks (``add``)
                p.y[:y.numel()].copy_(to_chunks(y))
            else:
                p.y[:, :y.shape[1]] = y
