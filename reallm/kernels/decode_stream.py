"""A decode step's matrix products as one persistent, weight-streaming kernel (``csrc/cuda/decode_stream.cu``).

A :class:`StreamProgram` is a static list of products ``y = f(x) @ W^T`` over 64 rows, each reading the
output of earlier products; ``run`` executes all of them in one launch. Inside, every SM streams its share
of every product's weights into shared memory ahead of the activations, so the memory system does not
idle at product boundaries (the reason a chain of library GEMMs reads a decode step's weights at 2/3 of
copy bandwidth). Inputs may be transformed as they are staged: ``mode="swiglu"`` reads ``[gate | up]``
(2K columns) and multiplies ``silu(gate) * up``.

:meth:`StreamProgram.reference` runs the same program with torch (fp32 products, bf16 outputs): the
definition the kernel is tested against, and the path on machines without CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from reallm.kernels.jit import JitExtension

_EXT = JitExtension("reallm_decode_stream_v1", "decode_stream.cu")
#: Rows (sequences) of a step the kernel computes (``kM``).
ROWS = 64
#: Program row layout (``csrc/cuda/decode_stream.cu``, ``F_*``).
_FIELDS = ("w", "x", "y", "partial", "tickets", "N", "K", "x_stride", "y_stride", "split", "mode", "dep",
           "tasks", "task0", "tiles")
_MODES = {"plain": 0, "swiglu": 1}
#: Weight bytes per shared-memory slot (``kChunkBytes``): BN rows times BK = 8192 / BN columns.
_CHUNK_ELEMS = 8192


def available(verbose: bool = False) -> bool:
    return _EXT.load(verbose) is not None


@dataclass
class _Product:
    w: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    mode: str
    split: int
    dep: int


class StreamProgram:
    """Products to run in one launch, in dependency order; ``bn`` weight rows per task (64 or 128)."""

    def __init__(self, bn: int = 64):
        if bn not in (64, 128):
            raise ValueError(f"bn must be 64 or 128, got {bn}")
        self.bn = bn
        self.bk = _CHUNK_ELEMS // bn
        self.products: list[_Product] = []
        self._built: Optional[dict] = None

    def add(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, mode: str = "plain", split: int = 1,
            dep: Optional[int] = None) -> int:
        """Append ``y[:, :N] = f(x) @ w.T``; ``x`` and ``y`` are [64, *] views with unit column stride.

        ``dep``: index of the product whose output ``x`` is (None: ``x`` is ready before the launch; products
        that read it must name it, the kernel orders nothing else). Returns this product's index.
        """
        n, k = w.shape
        where = f"product {len(self.products)} (w {tuple(w.shape)})"
        if mode not in _MODES:
            raise ValueError(f"{where}: mode must be one of {sorted(_MODES)}, got {mode!r}")
        if w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16:
            raise ValueError(f"{where}: w, x and y must be bfloat16")
        if not w.is_contiguous() or x.stride(-1) != 1 or y.stride(-1) != 1:
            raise ValueError(f"{where}: w must be contiguous, x and y need unit column stride")
        if x.shape[0] != ROWS or y.shape[0] != ROWS:
            raise ValueError(f"{where}: x and y need {ROWS} rows (pad the step), got {x.shape[0]}, {y.shape[0]}")
        in_cols = 2 * k if mode == "swiglu" else k
        if x.shape[1] < in_cols or y.shape[1] < n:
            raise ValueError(f"{where}: x needs {in_cols} columns and y {n}, got {x.shape[1]} and {y.shape[1]}")
        if n % self.bn or k % (split * self.bk):
            raise ValueError(f"{where}: N must be a multiple of {self.bn} and K of split*{self.bk} = "
                             f"{split * self.bk}")
        if x.stride(0) % 8 or y.stride(0) % 2 or (x.data_ptr() | w.data_ptr()) % 16:
            raise ValueError(f"{where}: rows of x must be 16-byte aligned and y's 4-byte aligned")
        if dep is not None and not 0 <= dep < len(self.products):
            raise ValueError(f"{where}: dep {dep} must name an earlier product")
        self.products.append(_Product(w, x, y, mode, split, -1 if dep is None else dep))
        self._built = None
        return len(self.products) - 1

    def tasks(self) -> list[int]:
        return [p.w.shape[0] // self.bn * p.split for p in self.products]

    def _build(self) -> dict:
        if self._built is not None:
            return self._built
        dev = self.products[0].w.device
        tiles = [p.w.shape[0] // self.bn for p in self.products]
        partial_elems = max([ROWS * p.w.shape[0] * p.split for p in self.products if p.split > 1] or [4])
        partial = torch.empty(partial_elems, dtype=torch.float32, device=dev)
        tickets = torch.zeros(sum(tiles), dtype=torch.int32, device=dev)
        rows, task0, tick0 = [], 0, 0
        for p, nt in zip(self.products, tiles):
            n, k = p.w.shape
            f = {"w": p.w.data_ptr(), "x": p.x.data_ptr(), "y": p.y.data_ptr(), "partial": partial.data_ptr(),
                 "tickets": tickets.data_ptr() + 4 * tick0, "N": n, "K": k, "x_stride": p.x.stride(0),
                 "y_stride": p.y.stride(0), "split": p.split, "mode": _MODES[p.mode], "dep": p.dep,
                 "tasks": nt * p.split, "task0": task0, "tiles": nt}
            rows.append([f[name] for name in _FIELDS] + [0] * (16 - len(_FIELDS)))
            task0 += nt * p.split
            tick0 += nt
        self._built = {"prog": torch.tensor(rows, dtype=torch.int64, device=dev), "partial": partial,
                       "tickets": tickets, "done": torch.zeros(len(rows), dtype=torch.int32, device=dev),
                       "exit": torch.zeros(1, dtype=torch.int32, device=dev), "T": task0}
        return self._built

    def run(self, grid: Optional[int] = None) -> None:
        """Launch the kernel on the current stream (capturable in a CUDA graph after one eager run)."""
        ext = _EXT.load()
        if ext is None:
            raise RuntimeError(f"decode_stream kernel unavailable: {_EXT.error}")
        b = self._build()
        sms = torch.cuda.get_device_properties(self.products[0].w.device).multi_processor_count
        ext.run(b["prog"], len(self.products), b["T"], b["done"], b["exit"], self.bn, min(grid or sms, sms))

    def reference(self) -> None:
        """The program in torch: fp32 products of the bf16 inputs, one rounding of each output."""
        for p in self.products:
            k = p.w.shape[1]
            x = p.x[:, :k].float()
            if p.mode == "swiglu":
                x = (torch.nn.functional.silu(x) * p.x[:, k:2 * k].float()).to(torch.bfloat16).float()
            p.y[:, :p.w.shape[0]] = (x @ p.w.float().t()).to(p.y.dtype)
