"""A decode step's matrix products as one persistent, weight-streaming kernel (``csrc/cuda/decode_stream.cu``).

A :class:`StreamProgram` is a static list of products ``y = x @ W^T`` over 64 rows, each reading the
output of an earlier product; ``run`` executes all of them in one launch. Inside, every SM streams its
share of every product's weights into shared memory ahead of the activations, so the memory system does
not idle at product boundaries (the reason a chain of library GEMMs reads a decode step's weights at 2/3
of copy bandwidth). A product may end in SwiGLU: ``out="swiglu"`` takes W = [gate; up] (2I rows) and
writes ``silu(gate) * up`` (I columns), from the fp32 sums.

Layouts: weights are packed once (:func:`pack_weight`) and activations live in *chunked* buffers
(:func:`chunked_buffer`, :func:`to_chunks`, :func:`from_chunks`): 64 × 128 blocks, each one contiguous
16 KB copy into shared memory, swizzled so that the tensor-core loads hit distinct banks. A product's
output is chunked (the next product's input) or plain rows (``y`` a [64, N] view).

:meth:`StreamProgram.reference` runs the same program with torch (fp32 products of the bf16 inputs, one
rounding of each output): the definition the kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from reallm.kernels.jit import JitExtension

_EXT = JitExtension("reallm_decode_stream_v15", "decode_stream.cu")
#: Rows (sequences) of a step the kernel computes (``kM``); weight rows per task (``kBN``); chunk columns.
ROWS, TILE, CHUNK = 64, 64, 128
#: Program row layout (``csrc/cuda/decode_stream.cu``, ``F_*``).
_FIELDS = ("w", "x", "y", "partial", "tickets", "N", "K", "y_stride", "split", "out", "y_layout", "ready_in",
           "need", "ready_out", "task0", "tiles")
_OUTS = {"plain": 0, "swiglu": 1}


def available(verbose: bool = False) -> bool:
    return _EXT.load(verbose) is not None


def _swizzle_index(device) -> torch.Tensor:
    """[64, 16] unit permutation of a chunk: unit u of row r is stored at u ^ (r % 8) (an involution)."""
    r = torch.arange(ROWS, device=device)[:, None]
    u = torch.arange(CHUNK // 8, device=device)[None, :]
    return u ^ (r % 8)


def to_chunks(a: torch.Tensor) -> torch.Tensor:
    """[64, C] → the chunked 1-D layout (C a multiple of 128)."""
    rows, cols = a.shape
    if rows != ROWS or cols % CHUNK:
        raise ValueError(f"to_chunks: need [{ROWS}, multiple of {CHUNK}], got {list(a.shape)}")
    units = a.reshape(ROWS, cols // CHUNK, CHUNK // 8, 8).permute(1, 0, 2, 3)  # [chunk, row, unit, 8]
    idx = _swizzle_index(a.device)[None, :, :, None].expand_as(units)
    return units.gather(2, idx).contiguous().view(-1)


def from_chunks(buf: torch.Tensor, cols: int) -> torch.Tensor:
    """The chunked layout → [64, cols]."""
    n = -(-cols // CHUNK)
    units = buf[:n * ROWS * CHUNK].view(n, ROWS, CHUNK // 8, 8)
    idx = _swizzle_index(buf.device)[None, :, :, None].expand_as(units)
    return units.gather(2, idx).permute(1, 0, 2, 3).reshape(ROWS, n * CHUNK)[:, :cols]


def chunked_buffer(cols: int, device, dtype=torch.bfloat16) -> torch.Tensor:
    """A zeroed chunked activation of [64, cols] (cols rounded up to 128)."""
    return torch.zeros(-(-cols // CHUNK) * ROWS * CHUNK, dtype=dtype, device=device)


def pack_weight(w: torch.Tensor, glu: bool = False) -> torch.Tensor:
    """W [N, K] → tiles of 64 rows × chunks of 128 columns, each chunk swizzled (contiguous copies).

    ``glu``: W is [gate; up]; each tile gets 32 gate rows and then the 32 matching up rows.
    """
    n, k = w.shape
    if n % (2 * TILE if glu else TILE) or k % CHUNK:
        raise ValueError(f"pack_weight: N must be a multiple of {2 * TILE if glu else TILE} and K of {CHUNK}, "
                         f"got {list(w.shape)}")
    if glu:
        gate, up = w.view(2, n // TILE, TILE // 2, k).unbind(0)
        w = torch.cat([gate, up], dim=1).reshape(n, k)
    units = w.reshape(n // TILE, TILE, k // CHUNK, CHUNK // 8, 8).permute(0, 2, 1, 3, 4)  # [tile, chunk, row, u, 8]
    idx = _swizzle_index(w.device)[None, None, :, :, None].expand_as(units)
    return units.gather(3, idx).contiguous().view(-1)


@dataclass
class _Product:
    w: torch.Tensor        # the plain [N, K] matrix (the reference reads it)
    packed: torch.Tensor
    x: torch.Tensor        # chunked input
    y: torch.Tensor        # chunked output, or a [64, N'] row view
    out: str
    split: int
    dep: int

    @property
    def out_cols(self) -> int:
        return self.w.shape[0] // 2 if self.out == "swiglu" else self.w.shape[0]


class StreamProgram:
    """Products to run in one launch, in dependency order."""

    def __init__(self):
        self.products: list[_Product] = []
        self._built: Optional[dict] = None

    def add(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, out: str = "plain", split: int = 1,
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
        if n % (2 * TILE if out == "swiglu" else TILE) or k % (split * CHUNK):
            raise ValueError(f"{where}: N must be a multiple of {2 * TILE if out == 'swiglu' else TILE} and K "
                             f"of split*{CHUNK} = {split * CHUNK}")
        if x.dim() != 1 or x.numel() < k * ROWS or x.data_ptr() % 16:
            raise ValueError(f"{where}: x must be a chunked buffer (chunked_buffer) of at least {k} columns")
        cols = n // 2 if out == "swiglu" else n
        if y.dim() == 1:
            if y.numel() < -(-cols // CHUNK) * CHUNK * ROWS or y.data_ptr() % 16:
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
        self.products.append(_Product(w, pack_weight(w, glu=out == "swiglu"), x, y, out, split,
                                      -1 if dep is None else dep))
        self._built = None
        return len(self.products) - 1

    def tasks(self) -> list[int]:
        return [p.w.shape[0] // TILE * p.split for p in self.products]

    def _build(self) -> dict:
        if self._built is not None:
            return self._built
        dev = self.products[0].w.device
        tiles = [p.w.shape[0] // TILE for p in self.products]
        # fp32 partial tiles, a region per split product: consecutive products overlap in time (a product
        # starts on the input chunks that are ready), so one product's slices must not overwrite another's
        sizes = [ROWS * p.w.shape[0] * p.split if p.split > 1 else 0 for p in self.products]
        partial = torch.empty(max(sum(sizes), 4), dtype=torch.float32, device=dev)
        partial_at = [0] + torch.tensor(sizes).cumsum(0).tolist()[:-1]
        tickets = torch.zeros(sum(tiles), dtype=torch.int32, device=dev)
        # readiness counters of every chunked output, one per 128-column chunk
        starts, n_counters = [], 0
        for p in self.products:
            starts.append(n_counters if p.y.dim() == 1 else None)
            n_counters += -(-p.out_cols // CHUNK) if p.y.dim() == 1 else 0
        counters = torch.zeros(max(n_counters, 1), dtype=torch.int32, device=dev)
        rows, task0, tick0 = [], 0, 0
        for i, (p, nt) in enumerate(zip(self.products, tiles)):
            ready_in = 0 if p.dep < 0 else counters.data_ptr() + 4 * starts[p.dep]
            need = 0 if p.dep < 0 else (4 if self.products[p.dep].out == "swiglu" else 2)
            ready_out = 0 if starts[i] is None else counters.data_ptr() + 4 * starts[i]
            n, k = p.w.shape
            f = {"w": p.packed.data_ptr(), "x": p.x.data_ptr(), "y": p.y.data_ptr(),
                 "partial": partial.data_ptr() + 4 * partial_at[i],
                 "tickets": tickets.data_ptr() + 4 * tick0, "N": n, "K": k,
                 "y_stride": p.y.stride(0) if p.y.dim() == 2 else 0, "split": p.split, "out": _OUTS[p.out],
                 "y_layout": 0 if p.y.dim() == 1 else 1, "ready_in": ready_in, "need": need,
                 "ready_out": ready_out, "task0": task0, "tiles": nt}
            rows.append([f[name] for name in _FIELDS])
            task0 += nt * p.split
            tick0 += nt
        self._built = {"prog": torch.tensor(rows, dtype=torch.int64, device=dev), "partial": partial,
                       "tickets": tickets, "counters": counters,
                       "exit": torch.zeros(1, dtype=torch.int32, device=dev), "T": task0}
        return self._built

    def run(self, grid: Optional[int] = None, flags: int = 0, trace: Optional[torch.Tensor] = None) -> None:
        """Launch the kernel on the current stream (capturable in a CUDA graph after one eager run).

        ``flags`` are timing diagnostics (wrong results): 1 inputs do not wait for their products, 2 no
        arithmetic (the two streams alone). ``trace``: int64 [tasks, 4] to receive each task's global timer
        (ns) at its start, first input chunk, end of products, end of epilogue.
        """
        ext = _EXT.load()
        if ext is None:
            raise RuntimeError(f"decode_stream kernel unavailable: {_EXT.error}")
        b = self._build()
        sms = torch.cuda.get_device_properties(self.products[0].w.device).multi_processor_count
        ext.run(b["prog"], len(self.products), b["T"], b["counters"], b["exit"], min(grid or sms, sms), flags, trace)

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
            if p.y.dim() == 1:
                n = -(-y.shape[1] // CHUNK) * CHUNK
                full = from_chunks(p.y, n).clone()
                full[:, :y.shape[1]] = y
                p.y.copy_(to_chunks(full))
            else:
                p.y[:, :y.shape[1]] = y
