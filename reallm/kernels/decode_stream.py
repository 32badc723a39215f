"""A decode step's matrix products as one persistent, weight-streaming kernel (``csrc/cuda/decode_stream.cu``).

A :class:`StreamProgram` is a static list of products ``y = x @ W^T`` over 64 rows, each reading the
output of an earlier product; ``run`` executes all of them in one launch. Inside, every SM streams its
share of every product's weights into shared memory ahead of the activations, so the memory system does
not idle at product boundaries (the reason a chain of library GEMMs reads a decode step's weights at 2/3
of copy bandwidth). A product may end in SwiGLU: ``out="swiglu"`` takes W = [gate; up] (2I rows) and
writes ``silu(gate) * up`` (I columns), from the fp32 sums; in a residual add (``out="residual"``, which
also keeps its rows' sums of squares); it may be scaled by its input rows' RMSNorm (``norm=``). A qkv
product (:meth:`StreamProgram.add_qkv`) applies rope and appends k and v to the caches, and an attention
phase (:meth:`StreamProgram.add_attention`) reads them: with those, a whole decode step is one program
(:mod:`reallm.kernels.decode_step`).

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

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from reallm.kernels.jit import JitExtension

# wgmma needs the architecture-specific target (sm_90a), which torch's default arch flags do not give
_EXT = JitExtension("reallm_decode_stream_v63", "decode_stream.cu",
                    cuda_flags=("-gencode=arch=compute_90a,code=sm_90a",))
#: Rows (sequences) of a step the kernel computes (``kM``); weight rows per tile (``kTile``), per consumer
#: half (``kHalf``); chunk columns (``kBK``).
ROWS, TILE, HALF, CHUNK = 64, 128, 64, 128
#: Columns of an attention head (the rope and attention phases assume it).
HEAD = 64
#: Program row layout (``csrc/cuda/decode_stream.cu``, ``F_*``; 32 int64 per row).
_FIELDS = ("w", "x", "y", "partial", "tickets", "N", "K", "y_stride", "out", "y_layout", "ready_in", "need",
           "ready_out", "ss_in", "eps", "res", "ss_out", "k_cache", "v_cache", "pos", "freq", "q_cols", "kv_cols",
           "max_len", "group", "x_stride", "scale")
_ROW = 32
_OUTS = {"plain": 0, "swiglu": 1, "residual": 2, "qkv": 3, "attention": 4}
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


def schedule(shapes: list, grid: int) -> tuple[list[list[Segment]], list[int]]:
    """Stream-K split of products of (tiles, chunks per tile) over ``grid`` CTAs; an int entry is an attention
    phase of that many items (one segment each, ``tile`` the item, no chunks), cut into equal runs.

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
    for p, shape in enumerate(shapes):
        if isinstance(shape, int):  # an attention phase: its items in equal contiguous runs
            for cta in range(grid):
                lists[cta] += [Segment(p, item, 0, 0, -1, -1, 0)
                               for item in range(cta * shape // grid, (cta + 1) * shape // grid)]
            slots.append(0)
            continue
        tiles, chunks = shape
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


@functools.lru_cache(maxsize=16)
def _schedule_table(shapes: tuple, grid: int) -> tuple[list[list[Segment]], list[int], torch.Tensor]:
    """:func:`schedule` and its segment table (int32 [grid, L, 8], on the host), kept per (shapes, grid): a
    model's programs over new caches (a generation call's runner) share them (Python: ~2 ms a layer)."""
    lists, slots = schedule(list(shapes), grid)
    length = max(1, max(len(segs) for segs in lists))
    table = torch.zeros(grid, length, 8, dtype=torch.int32)
    for cta, segs in enumerate(lists):
        if segs:
            table[cta, :len(segs), :7] = torch.tensor(segs, dtype=torch.int32)
    return lists, slots, table


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


def stream_cache(cache: torch.Tensor) -> torch.Tensor:
    """Keys or values [rows, heads, max_len, 64] in the plain layout ⇄ the kernel's stream layout (an
    involution): position p's 16-byte units permuted, unit u stored at u ^ (p % 8), so that the tensor
    cores' loads of eight consecutive positions hit eight bank groups."""
    rows, heads, n, d = cache.shape
    if d != HEAD:
        raise ValueError(f"stream_cache: rows of {HEAD} values, got {list(cache.shape)}")
    units = cache.reshape(rows, heads, n, 8, 8)
    idx = torch.arange(8, device=cache.device)[None, :] ^ (torch.arange(n, device=cache.device)[:, None] % 8)
    return units.gather(3, idx[None, None, :, :, None].expand_as(units)).reshape(cache.shape)


def stream_caches_in_place(caches: list[torch.Tensor]) -> None:
    """``c.copy_(stream_cache(c))`` for every cache: one launch on CUDA (``permute_caches``) where the
    extension is built and the caches are contiguous bf16 of one shape, else torch."""
    ext = _EXT.load() if caches and caches[0].is_cuda else None
    shape = caches[0].shape if caches else None
    if (ext is None or not hasattr(ext, "permute_caches") or shape[-1] != HEAD
            or len({c.data_ptr() for c in caches}) != len(caches)  # (twice in place would permute back)
            or any(c.shape != shape or c.dtype != torch.bfloat16 or not c.is_contiguous() or c.data_ptr() % 16
                   or c.device != caches[0].device for c in caches)):
        for c in caches:
            c.copy_(stream_cache(c))
        return
    table = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64).to(caches[0].device, non_blocking=True)
    ext.permute_caches(table, shape[0] * shape[1] * shape[2], shape[2])


#: ``pack`` table row (csrc/cuda/decode_stream.cu, ``P_*``).
_PACK_ROW = 16


def pack_many(jobs: list[tuple[torch.Tensor, list[torch.Tensor], Optional[torch.Tensor], bool]]) -> bool:
    """Pack several matrices in one launch: each job is (destination of ``pack_weight``'s layout, sources
    stacked along N (up to three row-major bf16 [rows, K]), the norm weight folded into the columns (bf16 [K])
    or None, glu). Bitwise the torch fold and :func:`pack_weight`. False (nothing done) where the CUDA
    extension or the tensors do not fit: the caller packs with torch."""
    if not jobs or not jobs[0][0].is_cuda:
        return False
    device = jobs[0][0].device
    ext = _EXT.load()
    if ext is None or not hasattr(ext, "pack"):
        return False
    rows, first = [], 0
    for dst, srcs, gamma, glu in jobs:
        k = srcs[0].shape[-1]
        n = sum(t.shape[0] for t in srcs)
        tensors = [dst, *srcs] + ([gamma] if gamma is not None else [])
        ok = (1 <= len(srcs) <= 3 and dst.dtype == torch.bfloat16 and dst.is_contiguous() and dst.numel() == n * k
              and n % TILE == 0 and k % CHUNK == 0
              and all(t.dim() == 2 and t.shape[1] == k and t.dtype == torch.bfloat16 and t.is_contiguous()
                      for t in srcs)
              and (gamma is None or (gamma.shape == (k,) and gamma.dtype == torch.bfloat16 and gamma.is_contiguous()))
              and all(t.device == device and t.data_ptr() % 16 == 0 for t in tensors))  # 16-byte units
        if not ok:
            return False
        row = [dst.data_ptr(), n, k, int(glu), gamma.data_ptr() if gamma is not None else 0, first, len(srcs)]
        for t in srcs:
            row += [t.data_ptr(), t.shape[0]]
        rows.append(row + [0] * (_PACK_ROW - len(row)))
        first += n * k // 8
    table = torch.tensor(rows, dtype=torch.int64).to(jobs[0][0].device, non_blocking=True)
    ext.pack(table, first)
    return True


def _stream_row(vals: torch.Tensor, pos: int) -> torch.Tensor:
    """[heads, 64] values of position ``pos`` ⇄ the stream layout."""
    idx = torch.arange(8, device=vals.device) ^ (pos % 8)
    return vals.reshape(-1, 8, 8)[:, idx].reshape(vals.shape)


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
    """One operation of a program: a product (``w`` given) or an attention phase (``w`` None)."""
    w: Optional[torch.Tensor]       # the plain [N, K] matrix (the reference reads it)
    packed: Optional[torch.Tensor]
    x: torch.Tensor        # chunked input; attention: the query rows [64, ≥ H·64]
    y: torch.Tensor        # chunked output, or a [64, N'] row view (qkv: the query rows)
    out: str
    dep: int
    norm: Optional[tuple] = None          # (sums of squares: a residual product's index or an fp32 [64], eps)
    residual: Optional[torch.Tensor] = None  # out "residual": the chunked residual
    attn: Optional[dict] = None           # out "qkv" / "attention": caches, positions, rope, heads

    @property
    def out_cols(self) -> int:
        if self.w is None:
            return self.attn["q_cols"]
        return self.w.shape[0] // 2 if self.out == "swiglu" else self.w.shape[0]

    @property
    def publishes(self) -> bool:
        """Whether later operations wait on this one's output chunks (readiness counters)."""
        return self.y.dim() == 1 or self.out == "qkv"

    @property
    def chunk_need(self) -> int:
        """Arrivals that make one of its output chunks ready: the tiles (or attention items, a pair of rows each)
        writing it."""
        return {"swiglu": 2, "attention": ROWS // 2}.get(self.out, 1)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _float_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32).item())


class StreamProgram:
    """Products (and attention phases) to run in one launch, in dependency order."""

    def __init__(self, keep_plain: bool = True):
        self.products: list[_Product] = []
        self._built: dict[int, dict] = {}
        self._ss: dict[int, int] = {}  # residual product -> its row in the sums-of-squares scratch
        #: Keep each product's plain matrix (what :meth:`reference` reads); False: only the packed one the
        #: kernel reads (half the memory, at no point both).
        self.keep_plain = keep_plain

    def _pack(self, w: torch.Tensor, glu: bool, packed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the product's plain matrix as kept, its packed weights): ``packed`` (made by :func:`pack_weight` of
        such a matrix, e.g. shared with another program over the same model) or packed here."""
        if packed is None:
            packed = pack_weight(w, glu=glu)
        elif packed.numel() != w.numel() or packed.dtype != torch.bfloat16:
            raise ValueError(f"packed weights of {packed.numel()} bf16 elements for a {list(w.shape)} matrix")
        return (w if self.keep_plain else w.to("meta")), packed

    def _check_dep(self, where: str, dep: Optional[int], x: torch.Tensor) -> int:
        if dep is None:
            return -1
        if not 0 <= dep < len(self.products):
            raise ValueError(f"{where}: dep {dep} must name an earlier product")
        src = self.products[dep].y
        if src.dim() != 1 or src.data_ptr() != x.data_ptr():
            raise ValueError(f"{where}: x must be product {dep}'s chunked output buffer (dep={dep})")
        return dep

    def _check_norm(self, where: str, norm, x: torch.Tensor, k: int, dep: int):
        if norm is None:
            return None
        src, eps = norm
        if isinstance(src, int):
            if src not in self._ss:
                raise ValueError(f"{where}: norm source {src} must be an earlier product with out='residual'")
            if src != dep:
                # the epilogue waits for the dep's output chunks: only then are the source's sums complete
                raise ValueError(f"{where}: a norm over product {src}'s rows needs dep={src} (x its output), "
                                 f"got dep={None if dep < 0 else dep}")
            if self.products[src].out_cols != k:
                raise ValueError(f"{where}: the norm's rows have {self.products[src].out_cols} columns, K is {k}")
        elif src.dtype != torch.float32 or src.numel() < ROWS or not src.is_contiguous() or src.device != x.device:
            raise ValueError(f"{where}: norm sums of squares must be a contiguous float32 [{ROWS}] on the "
                             f"program's device")
        return (src, float(eps))

    def _check_residual(self, where: str, residual: torch.Tensor, dep: int) -> None:
        """A residual is read with no wait of its own: it must be ready before the launch, or the input of a
        normed product this one depends on (whose epilogues waited for all of it)."""
        made = {p.y.data_ptr() for p in self.products if p.y.dim() == 1}
        if residual.data_ptr() not in made:
            return
        a = dep
        while a >= 0:
            p = self.products[a]
            if p.norm is not None and p.x.data_ptr() == residual.data_ptr():
                return
            a = p.dep
        raise ValueError(f"{where}: the residual is written in this launch but is not the input of a normed "
                         f"product on this one's dep chain: nothing orders the read after its writes")

    def add(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, out: str = "plain",
            dep: Optional[int] = None, norm: Optional[tuple] = None, residual: Optional[torch.Tensor] = None,
            packed: Optional[torch.Tensor] = None) -> int:
        """Append ``y = x[:, :K] @ w.T`` (or its SwiGLU); returns the product's index.

        ``x``: a chunked buffer with at least K columns. ``y``: a chunked buffer, or a [64, ≥ N'] bf16 view
        with unit column stride (N' = N, or N / 2 for SwiGLU). ``dep``: the product whose output buffer ``x``
        is (None: ``x`` is ready before the launch); each input chunk is read once the dep's tiles writing it
        are done, and the kernel orders nothing else — give every product its own output buffer.
        ``norm``: (sums of squares, eps) — RMSNorm of the input rows: the product is scaled by
        rsqrt(ss / K + eps) row by row (fold the norm's weight into ``w``); ss is an earlier residual product's
        index (its output is ``x``) or a float32 [64] ready before the launch. ``out="residual"``: y (chunked)
        = ``residual`` + x @ w.T, and the kernel keeps y's rows' sums of squares for a later ``norm``.
        """
        where = f"product {len(self.products)} (w {list(w.shape)})"
        if out not in ("plain", "swiglu", "residual"):
            raise ValueError(f"{where}: out must be one of ['plain', 'residual', 'swiglu'], got {out!r}")
        n, k = self._check_product(where, w, x, y, out)
        dep_i = self._check_dep(where, dep, x)
        norm = self._check_norm(where, norm, x, k, dep_i)
        if out == "residual":
            if y.dim() != 1:
                raise ValueError(f"{where}: a residual output is a chunked buffer")
            if residual is None or residual.dim() != 1 or residual.numel() < n * ROWS or residual.dtype != torch.bfloat16:
                raise ValueError(f"{where}: out='residual' needs residual=, a chunked buffer of ≥ {n} columns")
            self._check_residual(where, residual, dep_i)
        elif residual is not None:
            raise ValueError(f"{where}: residual= needs out='residual'")
        self.products.append(_Product(*self._pack(w, out == "swiglu", packed), x, y, out, dep_i, norm, residual))
        if out == "residual":
            self._ss[len(self.products) - 1] = len(self._ss)
        self._built = {}
        return len(self.products) - 1

    def reload(self, i: int, w: torch.Tensor) -> None:
        """New weights for product ``i`` (its shape, bf16), packed in place: launches captured earlier read them."""
        p = self.products[i]
        if p.w is None or tuple(w.shape) != tuple(p.w.shape) or w.dtype != torch.bfloat16:
            raise ValueError(f"reload: product {i} takes a bf16 {list(p.w.shape) if p.w is not None else 'nothing'}, "
                             f"got {w.dtype} {list(w.shape)}")
        p.packed.copy_(pack_weight(w, glu=p.out == "swiglu"))
        if p.w.device.type != "meta":
            p.w = w


    def _check_product(self, where, w, x, y, out, cols=None):
        n, k = w.shape
        if any(t.dtype != torch.bfloat16 for t in (w, x, y)):
            raise ValueError(f"{where}: w, x and y must be bfloat16")
        if n % TILE or k % CHUNK:
            raise ValueError(f"{where}: N must be a multiple of {TILE} and K of {CHUNK}")
        if x.dim() != 1 or x.numel() < k * ROWS or x.data_ptr() % 16:
            raise ValueError(f"{where}: x must be a chunked buffer (chunked_buffer) of at least {k} columns")
        cols = cols or (n // 2 if out == "swiglu" else n)
        if y.dim() == 1:
            if cols % CHUNK:
                raise ValueError(f"{where}: a chunked output needs whole chunks: {cols} columns is not a multiple "
                                 f"of {CHUNK} (write rows instead, or pad N)")
            if y.numel() < cols * ROWS or y.data_ptr() % 16:
                raise ValueError(f"{where}: y must be a chunked buffer of at least {cols} columns")
        elif y.shape[0] != ROWS or y.shape[1] < cols or y.stride(1) != 1 or y.stride(0) % 8 or y.data_ptr() % 16:
            raise ValueError(f"{where}: y rows must be a [{ROWS}, ≥{cols}] view, unit column stride, 16-byte "
                             f"aligned rows; got {list(y.shape)} strides {y.stride()}")
        return n, k

    def add_qkv(self, w: torch.Tensor, x: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, q_cols: int,
                dep: Optional[int] = None, norm: Optional[tuple] = None, packed: Optional[torch.Tensor] = None) -> int:
        """Append an attention block's projections: ``w`` = [Wq; Wk; Wv] (q_cols, then kv_cols twice, heads of
        64); rope (``inv_freq`` [32] fp32, rotate-half pairs i, i + 32) on q and k at each row's position;
        q to the rows ``q`` [64, ≥ q_cols]; k, v to ``k_cache``/``v_cache`` [≥ rows, kv heads, max_len, 64]
        at (row, head, ``positions[row]``), in the stream layout (:func:`stream_cache`; max_len a multiple of
        128, the entries past a row's position finite: they are read and masked). ``positions``: int64 [64],
        −1 for a padding row (nothing cached).
        """
        n, k = w.shape
        where = f"product {len(self.products)} (qkv {list(w.shape)})"
        kv_cols = (n - q_cols) // 2
        if q_cols <= 0 or kv_cols <= 0 or q_cols % HEAD or kv_cols % HEAD or q_cols + 2 * kv_cols != n \
                or q_cols % CHUNK:
            raise ValueError(f"{where}: w must be [Wq; Wk; Wv] with heads of {HEAD} columns and q_cols a multiple of "
                             f"{CHUNK}, got N {n}, q_cols {q_cols}")
        self._check_product(where, w, x, q, "plain", cols=q_cols)
        if q.dim() != 2:
            raise ValueError(f"{where}: q must be a [{ROWS}, ≥{q_cols}] row view")
        self._check_cache(where, k_cache, v_cache, kv_cols // HEAD, positions)
        if inv_freq.dtype != torch.float32 or inv_freq.numel() != HEAD // 2:
            raise ValueError(f"{where}: inv_freq must be float32 [{HEAD // 2}]")
        dep_i = self._check_dep(where, dep, x)
        norm = self._check_norm(where, norm, x, k, dep_i)
        attn = {"q_cols": q_cols, "kv_cols": kv_cols, "k": k_cache, "v": v_cache, "pos": positions,
                "freq": inv_freq.contiguous()}
        self.products.append(_Product(*self._pack(w, False, packed), x, q, "qkv", dep_i, norm, None, attn))
        self._built = {}
        return len(self.products) - 1

    def _check_cache(self, where, k_cache, v_cache, heads, positions):
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.dtype != torch.bfloat16 or c.dim() != 4 or c.shape[1] != heads or c.shape[3] != HEAD \
                    or not c.is_contiguous() or c.data_ptr() % 16:
                raise ValueError(f"{where}: {name} must be a contiguous bf16 [rows, {heads}, max_len, {HEAD}], "
                                 f"16-byte aligned, got {c.dtype} {list(c.shape)}")
        taken = [t for p in self.products if p.out == "qkv" for t in (p.attn["k"], p.attn["v"])]
        for c in [v_cache] + taken:
            if _overlap(k_cache, c) or (c is not v_cache and _overlap(v_cache, c)):
                raise ValueError(f"{where}: the caches overlap each other or an earlier layer's: every layer needs "
                                 f"its own k and v storage")
        if k_cache.shape[2] % CHUNK:
            raise ValueError(f"{where}: the caches' max_len must be a multiple of {CHUNK}, got {k_cache.shape[2]}")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"{where}: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
        if positions.dtype != torch.int64 or positions.numel() != ROWS or not positions.is_contiguous():
            raise ValueError(f"{where}: positions must be a contiguous int64 [{ROWS}] (−1 for padding rows; "
                             f"each other row r below the caches' rows, its position below max_len)")

    def add_attention(self, qkv: int, y: torch.Tensor, *, scale: float) -> int:
        """Append the attention of product ``qkv``'s rows (its query rows against its caches, positions
        0 .. positions[row]): y (chunked, q_cols columns) = softmax(q · k * scale) v per query head, heads
        grouped over the kv heads (an even number of query heads per kv head, at most 8)."""
        where = f"product {len(self.products)} (attention of {qkv})"
        if not 0 <= qkv < len(self.products) or self.products[qkv].out != "qkv":
            raise ValueError(f"{where}: qkv must name an earlier add_qkv product")
        a = self.products[qkv].attn
        group = a["q_cols"] // a["kv_cols"]
        if a["q_cols"] % a["kv_cols"] or group % 2 or group > 8:
            raise ValueError(f"{where}: {a['q_cols'] // HEAD} query heads over {a['kv_cols'] // HEAD} kv heads: "
                             f"need an even number, at most 8, per kv head")
        if y.dim() != 1 or y.dtype != torch.bfloat16 or y.numel() < a["q_cols"] * ROWS or y.data_ptr() % 16:
            raise ValueError(f"{where}: y must be a chunked buffer of at least {a['q_cols']} columns")
        attn = dict(a, group=group, scale=float(scale))
        self.products.append(_Product(None, None, self.products[qkv].y, y, "attention", qkv, None, None, attn))
        self._built = {}
        return len(self.products) - 1

    def shapes(self) -> list:
        """(tiles, chunks per tile) of every product, the items (pairs of rows) of every attention phase: the work
        :func:`schedule` splits."""
        return [(p.w.shape[0] // TILE, p.w.shape[1] // CHUNK) if p.w is not None
                else ROWS // 2 * (p.attn["kv_cols"] // HEAD) for p in self.products]

    def _row(self, i: int, ptrs: dict) -> list[int]:
        p = self.products[i]
        a = p.attn or {}
        f = dict.fromkeys(_FIELDS, 0)
        f.update(x=p.x.data_ptr(), y=p.y.data_ptr(), out=_OUTS[p.out], y_layout=0 if p.y.dim() == 1 else 1,
                 y_stride=p.y.stride(0) if p.y.dim() == 2 else 0, partial=ptrs["partial"][i],
                 tickets=ptrs["tickets"][i])
        if p.w is not None:
            f.update(w=p.packed.data_ptr(), N=p.w.shape[0], K=p.w.shape[1])
        if p.dep >= 0:
            f.update(ready_in=ptrs["counters"][p.dep], need=self.products[p.dep].chunk_need)
        if p.publishes:
            f["ready_out"] = ptrs["counters"][i]
        if p.norm is not None:
            src, eps = p.norm
            f.update(ss_in=ptrs["ss"][src] if isinstance(src, int) else src.data_ptr(), eps=_float_bits(eps))
        if p.out == "residual":
            f.update(res=p.residual.data_ptr(), ss_out=ptrs["ss"][i])
        if a:
            f.update(k_cache=a["k"].data_ptr(), v_cache=a["v"].data_ptr(), pos=a["pos"].data_ptr(),
                     q_cols=a["q_cols"], kv_cols=a["kv_cols"], max_len=a["k"].shape[2])
        if p.out == "qkv":
            f["freq"] = a["freq"].data_ptr()
        if p.out == "attention":
            f.update(x_stride=p.x.stride(0), group=a["group"], scale=_float_bits(a["scale"] * 1.4426950408889634))
        return [f[name] for name in _FIELDS] + [0] * (_ROW - len(_FIELDS))

    def _build(self, grid: int) -> dict:
        if grid in self._built:
            return self._built[grid]
        dev = self.products[0].x.device
        shapes = self.shapes()
        lists, slots, table = _schedule_table(tuple(shapes), grid)
        tiles = [s[0] if isinstance(s, tuple) else 0 for s in shapes]
        # fp32 sums tiles of the spread tiles, a region per product (zeroed here, left zeroed by the kernel)
        partial = torch.zeros(max(sum(slots), 1) * _SLOT_FLOATS, dtype=torch.float32, device=dev)
        slot_at = [0] + torch.tensor(slots).cumsum(0).tolist()[:-1]
        tickets = torch.zeros(max(sum(tiles), 1), dtype=torch.int32, device=dev)
        tick_at = [0] + torch.tensor(tiles).cumsum(0).tolist()[:-1]
        # readiness counters of every output later operations wait on, one per 128-column chunk
        starts, n_counters = [], 0
        for p in self.products:
            starts.append(n_counters)
            n_counters += p.out_cols // CHUNK if p.publishes else 0
        counters = torch.zeros(max(n_counters, 1), dtype=torch.int32, device=dev)
        # the residual outputs' rows' sums of squares (zeroed here, left zeroed by the kernel)
        scratch = torch.zeros(max(len(self._ss), 1) * ROWS, dtype=torch.float32, device=dev)
        ptrs = {"partial": [partial.data_ptr() + 4 * _SLOT_FLOATS * a for a in slot_at],
                "tickets": [tickets.data_ptr() + 4 * a for a in tick_at],
                "counters": [counters.data_ptr() + 4 * a for a in starts],
                "ss": {i: scratch.data_ptr() + 4 * ROWS * r for i, r in self._ss.items()}}
        rows = [self._row(i, ptrs) for i in range(len(self.products))]
        self._built[grid] = {"prog": torch.tensor(rows, dtype=torch.int64, device=dev), "segs": table.to(dev),
                             "lens": torch.tensor([len(x) for x in lists], dtype=torch.int32, device=dev),
                             "lists": lists, "partial": partial, "tickets": tickets, "counters": counters,
                             "scratch": scratch, "exit": torch.zeros(1, dtype=torch.int32, device=dev)}
        return self._built[grid]

    def grid(self, grid: Optional[int] = None) -> int:
        sms = torch.cuda.get_device_properties(self.products[0].x.device).multi_processor_count
        return min(grid or sms, sms)

    def segments(self, grid: Optional[int] = None) -> list[list[Segment]]:
        """Every CTA's segments at this grid (the rows of a trace)."""
        return self._build(self.grid(grid))["lists"]

    def run(self, grid: Optional[int] = None, flags: int = 0, trace: Optional[torch.Tensor] = None,
            variant: int = 0, max_inflight: int = 1) -> None:
        """Launch the kernel on the current stream (capturable in a CUDA graph after one eager run).

        ``flags`` are timing diagnostics (wrong results): 1 inputs do not wait for their products, 2 no
        product arithmetic (3: the two streams alone), 4 no partial sums, 8 no input copies, 16 no attention
        arithmetic, 32 no epilogue stores, 64 finalizers do not wait for their pieces, 128 rope's angles
        computed for every qkv tile (not once). ``trace``: int64 [grid, segments,
        8] to receive each segment's global timers (ns): consumers' start, first input chunk, end of products
        (attention: of the merge), end of epilogue; first weight (or key/value) copy issued; the other
        pieces' sums landed (a finalizer; attention: the last key/value slot done); first input copy issued;
        publication (csrc/cuda/decode_stream.cu). ``variant``:
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
        ext.run(b["prog"], b["segs"], b["lens"], b["counters"], b["scratch"], b["exit"], flags, trace, variant,
                max_inflight)

    def output(self, i: int) -> torch.Tensor:
        """Operation ``i``'s output as [64, N'] (qkv: the query rows; its keys and values are in the caches)."""
        p = self.products[i]
        return from_chunks(p.y, p.out_cols) if p.y.dim() == 1 else p.y[:, :p.out_cols if p.out != "qkv"
                                                                         else p.attn["q_cols"]]

    def _sums_of_squares(self, src) -> torch.Tensor:
        if isinstance(src, int):
            return self.output(src).float().pow(2).sum(-1)
        return src[:ROWS].float()

    def reference_output(self, i: int) -> torch.Tensor:
        """Operation ``i`` in fp32 torch from its inputs as they are now, rounded once to bf16 ([64, N'];
        qkv: [64, N] = rope'd q, rope'd k, v)."""
        p = self.products[i]
        if p.out == "attention":
            return self._attention(p)
        k = p.w.shape[1]
        y = from_chunks(p.x, k).float() @ p.w.float().t()
        if p.norm is not None:
            ss, eps = self._sums_of_squares(p.norm[0]), p.norm[1]
            y = y * torch.rsqrt(ss / k + eps)[:, None]
        if p.out == "swiglu":
            g, u = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(g) * u
        elif p.out == "residual":
            y = y + from_chunks(p.residual, y.shape[1]).float()
        elif p.out == "qkv":
            y = self._rope(p, y)
        return y.to(torch.bfloat16)

    @staticmethod
    def _rope(p: _Product, y: torch.Tensor) -> torch.Tensor:
        a = p.attn
        qk = a["q_cols"] + a["kv_cols"]
        ang = a["pos"].clamp_min(0).float()[:, None] * a["freq"].float()[None, :]  # [64, 32]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        heads = y[:, :qk].reshape(ROWS, qk // HEAD, 2, HEAD // 2)
        x1, x2 = heads[:, :, 0], heads[:, :, 1]
        rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=2).reshape(ROWS, qk)
        return torch.cat([rot, y[:, qk:]], dim=1)

    def _attention(self, p: _Product) -> torch.Tensor:
        a = p.attn
        heads, kv = a["q_cols"] // HEAD, a["kv_cols"] // HEAD
        out = torch.zeros(ROWS, heads, HEAD, dtype=torch.float32, device=p.y.device)
        q = p.x[:, :a["q_cols"]].float().view(ROWS, heads, HEAD)
        for b in range(ROWS):
            pos = int(a["pos"][b])
            if pos < 0:
                continue
            keys = stream_cache(a["k"][b:b + 1, :, :pos + 1])[0].float().repeat_interleave(a["group"], dim=0)
            vals = stream_cache(a["v"][b:b + 1, :, :pos + 1])[0].float().repeat_interleave(a["group"], dim=0)
            w = torch.softmax((keys @ q[b, :, :, None]).squeeze(-1) * a["scale"], dim=-1)  # [heads, ctx]
            out[b] = (w[:, None, :] @ vals).squeeze(1)
        assert kv * a["group"] == heads
        return out.view(ROWS, a["q_cols"]).to(torch.bfloat16)

    def reference(self) -> None:
        """The whole program in torch, in order (the kernel's definition)."""
        if any(p.w is not None and p.w.device.type == "meta" for p in self.products):
            raise RuntimeError("reference: a program made with keep_plain=False has no plain weights; only run()")
        for i, p in enumerate(self.products):
            y = self.reference_output(i)
            if p.out == "qkv":
                a = p.attn
                qc, kc = a["q_cols"], a["kv_cols"]
                p.y[:, :qc] = y[:, :qc]
                for b in range(ROWS):
                    pos = int(a["pos"][b])
                    if pos >= 0:
                        a["k"][b, :, pos] = _stream_row(y[b, qc:qc + kc].view(-1, HEAD), pos)
                        a["v"][b, :, pos] = _stream_row(y[b, qc + kc:].view(-1, HEAD), pos)
            elif p.y.dim() == 1:  # chunked outputs are whole chunks (``add``)
                p.y[:y.numel()].copy_(to_chunks(y))
            else:
                p.y[:, :y.shape[1]] = y
