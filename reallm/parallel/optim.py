"""AdamW over one rank's flat parameter buffer: fp32 gradient accumulation, bucketed data-parallel reduction,
optional ZeRO-1 (Adam states and fp32 masters sharded over dp) and optional host offload of the optimizer.

Buffers (N = this rank's flat-buffer length in the layout convention, padded to N' so every bucket divides
by dp)::

    params   [N']  model dtype   the parameters are views of it (``reallm.parallel.model``)
    grads    [N']  fp32          each backward's gradient is added here by a post-accumulate hook
    owned          fp32          the elements this rank updates: all of them, or under ZeRO-1 the chunk
                                 ``position`` of every bucket (``position`` = my place in the dp group)
    master, exp_avg, exp_avg_sq  fp32 over the owned elements (on the host with ``offload``)

Data parallel (losses are normalised by global counts, so gradients are *summed*): buckets of
``bucket_numel`` elements are all-reduced over dp (one collective per bucket, in order), or under ZeRO-1
reduce-scattered, each rank keeping its chunk. After the update, ZeRO-1 all-gathers every bucket's chunks
back into ``params``.

Update of owned element i with gradient g (torch.optim.AdamW's single-tensor formula; lr from
``reallm.model.optim.lr_at``; decay only on matrices, as ``MixedPrecisionAdamW``)::

    norm   = sqrt(sum over primary elements of every rank of g^2)      (caller supplies the reduction)
    g     *= min(1, clip / (norm + 1e-6))                               (skip the step if norm is not finite)
    p     *= 1 - lr * wd * [i in a matrix]
    m      = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;  t += 1
    p     -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

"Primary" elements count each parameter element once per dp replica (``reallm.layout.shards``): tp
replicas of norms and kv heads, and the tied copy of the embedding, are left out of the norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from reallm.layout.shards import DeviceShards
from reallm.model.optim import OptimizerSettings, lr_at
from reallm.parallel.groups import AxisGroup

DEFAULT_BUCKET_NUMEL = 1 << 24
_NORM_CHUNK = 1 << 24


@dataclass(frozen=True)
class Bucket:
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def make_buckets(num_elements: int, bucket_numel: int, dp: int) -> tuple[list[Bucket], int]:
    """Contiguous buckets covering ``num_elements``, each a multiple of ``dp`` long; returns (buckets, N')."""
    step = max(dp, (bucket_numel // dp) * dp)
    buckets, a = [], 0
    while a < num_elements:
        n = min(step, num_elements - a)
        n = -(-n // dp) * dp
        buckets.append(Bucket(a, a + n))
        a += n
    return buckets, a


def owned_runs(shards: DeviceShards, pieces: Sequence[tuple[int, int]],
               keep: Callable[[object], bool]) -> list[tuple[int, int]]:
    """Coalesced ``[a, b)`` runs, in the coordinates of the owned elements (the pieces back to back), of the
    shards for which ``keep(shard)`` holds (e.g. primary ones, matrices). Interval lists, not per-element
    masks: a mask would cost a byte per parameter element."""
    runs: list[tuple[int, int]] = []
    base = 0
    for pa, pb in pieces:
        for sh in shards.shards:
            lo, hi = max(sh.offset, pa), min(sh.offset + sh.num_elements, pb)
            if lo < hi and keep(sh):
                a, b = base + lo - pa, base + hi - pa
                if runs and runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], b)
                else:
                    runs.append((a, b))
        base += pb - pa
    return runs


class FlatAdamW:
    """The optimizer of one rank (module docstring). ``grads`` is filled by the caller's hooks."""

    def __init__(self, params_flat: torch.Tensor, shards: DeviceShards, settings: OptimizerSettings,
                 total_steps: int, dp: AxisGroup, *, zero1: bool = False, offload: bool = False,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.settings, self.total_steps = settings, total_steps
        self.dp, self.zero1, self.offload = dp, zero1 and dp.size > 1, offload
        self.params = params_flat
        n_padded = params_flat.numel()
        self.buckets, n = make_buckets(shards.num_elements, bucket_numel, dp.size if self.zero1 else 1)
        if n != n_padded:
            raise ValueError(f"flat parameters have {n_padded} elements, buckets need {n}")
        dev = params_flat.device
        self._grads = torch.zeros(n_padded, dtype=torch.float32, device=dev)
        # Lazy zeroing (``grad_accumulator``): after ``zero_grad`` a registered view is *stale*; the first
        # gradient overwrites it (no zero fill, no read of the old values), ``settle_grads`` zeroes the rest.
        self._views: list[torch.Tensor] = []
        self._stale: list[bool] = []
        self._gaps: list[tuple[int, int]] = [(0, n_padded)]
        self._gaps_stale = False
        # The owned elements, as (flat start, flat stop) pieces in order.
        if self.zero1:
            me = dp.group.ranks.index(dp.axis_ranks[dp.index])
            self.pieces = [(b.start + me * b.numel // dp.size, b.start + (me + 1) * b.numel // dp.size)
                           for b in self.buckets]
        else:
            self.pieces = [(0, n_padded)]
        self.num_owned = sum(b - a for a, b in self.pieces)
        self.host = torch.device("cpu") if offload else dev
        pin = offload and dev.type == "cuda"
        self.primary_runs = owned_runs(shards, self.pieces, lambda sh: sh.primary)
        self.decay_runs = owned_runs(shards, self.pieces, lambda sh: len(sh.local_shape) >= 2)
        own_is_all = not self.zero1 and not offload and params_flat.dtype == torch.float32
        # fp32 parameters updated in place are their own masters (as in MixedPrecisionAdamW).
        self.master = params_flat if own_is_all else self._gather_owned(params_flat).float().to(self.host).clone()
        self.exp_avg = torch.zeros(self.num_owned, dtype=torch.float32, device=self.host)
        self.exp_avg_sq = torch.zeros(self.num_owned, dtype=torch.float32, device=self.host)
        if pin:
            self.master, self.exp_avg, self.exp_avg_sq = (t.pin_memory() for t in (self.master, self.exp_avg,
                                                                                   self.exp_avg_sq))
        self.num_updates = 0

    def _gather_owned(self, flat: torch.Tensor) -> torch.Tensor:
        if len(self.pieces) == 1:
            a, b = self.pieces[0]
            return flat[a:b]
        return torch.cat([flat[a:b] for a, b in self.pieces])

    def _scatter_owned(self, flat: torch.Tensor, owned: torch.Tensor) -> None:
        off = 0
        for a, b in self.pieces:
            flat[a:b].copy_(owned[off:off + b - a])
            off += b - a

    @property
    def lr(self) -> float:
        return lr_at(self.num_updates, self.total_steps, self.settings)

    # -- gradients -------------------------------------------------------------------------------------------
    @property
    def grads(self) -> torch.Tensor:
        """The fp32 gradient buffer [N'], every stale view zeroed first."""
        self.settle_grads()
        return self._grads

    def grad_accumulator(self, offset: int, numel: int, shape: Sequence[int]) -> Callable[[torch.Tensor], None]:
        """``accumulate(g)``: add ``g`` into ``grads[offset:offset + numel]`` (viewed as ``shape``); right
        after ``zero_grad`` it copies instead (casting to fp32 on the way)."""
        i = len(self._views)
        view = self._grads[offset:offset + numel].view(*shape)
        self._views.append(view)
        self._stale.append(False)
        self._gaps = [(a, b) for ga, gb in self._gaps
                      for a, b in ((ga, min(gb, offset)), (max(ga, offset + numel), gb)) if b > a]

        def accumulate(g: torch.Tensor) -> None:
            if self._stale[i]:
                view.copy_(g)
                self._stale[i] = False
            else:
                view.add_(g)

        return accumulate

    def zero_grad(self) -> None:
        self._stale = [True] * len(self._views)
        self._gaps_stale = True

    def settle_grads(self) -> None:
        """Zero what ``zero_grad`` left stale: views no gradient reached, and the buffer outside every view."""
        if self._gaps_stale:
            for a, b in self._gaps:
                self._grads[a:b].zero_()
            self._gaps_stale = False
        for i, stale in enumerate(self._stale):
            if stale:
                self._views[i].zero_()
                self._stale[i] = False

    # -- data parallel -------------------------------------------------------------------------------------
    def reduce_dp(self) -> None:
        """Sum gradients over dp: all-reduce each bucket, or (ZeRO-1) reduce-scatter it into my chunk."""
        if self.dp.size == 1:
            return
        from executor import comm

        for b in self.buckets:
            view = self.grads[b.start:b.stop]
            if self.zero1:
                mine = comm.reduce_scatter_dim0(view, self.dp.group)
                me = self.dp.group.ranks.index(self.dp.axis_ranks[self.dp.index])
                n = b.numel // self.dp.size
                view[me * n:(me + 1) * n].copy_(mine)
            else:
                comm.all_reduce(view, self.dp.group)

    def owned_grads(self) -> torch.Tensor:
        return self._gather_owned(self.grads)

    # -- the update ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, norm_sq_reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Clip by the global norm, update the owned elements, write them (all-gathered) into the parameters."""
        lr = self.lr
        g = self.owned_grads()
        sq = torch.zeros((), dtype=torch.float64, device=g.device)
        for a, b in self.primary_runs:
            sq += sum_of_squares(g[a:b])
        norm = float(norm_sq_reduce(sq.reshape(1)).sqrt())
        stats = {"lr": lr, "grad_norm": norm, "skipped": 0.0}
        if not math.isfinite(norm):
            stats["skipped"] = 1.0
            return stats
        s = self.settings
        coef = s.gradient_clipping / (norm + 1e-6) if s.gradient_clipping > 0 else 1.0
        if coef < 1.0:
            g.mul_(coef)
        g = g.to(self.host)
        t = self.num_updates + 1
        m, v, p = self.exp_avg, self.exp_avg_sq, self.master
        if p.is_cuda:
            self._fused_update(p, g, lr, t)
            self.num_updates = t
            if p is not self.params:
                self._write_back()
            return stats
        if s.weight_decay:
            for a, b in self.decay_runs:
                p[a:b].mul_(1.0 - lr * s.weight_decay)
        m.lerp_(g, 1.0 - s.beta1)
        v.mul_(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)
        bc1, bc2 = 1.0 - s.beta1 ** t, 1.0 - s.beta2 ** t
        denom = (v.sqrt() / math.sqrt(bc2)).add_(s.eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        self.num_updates = t
        if p is not self.params:
            self._write_back()
        return stats

    def _fused_update(self, p: torch.Tensor, g: torch.Tensor, lr: float, t: int) -> None:
        """The same update with torch's fused AdamW kernel (CUDA): one launch per group of runs, no temporaries."""
        s = self.settings
        decay, rest, pos = [], [], 0
        for a, b in self.decay_runs:
            if a > pos:
                rest.append((pos, a))
            decay.append((a, b))
            pos = b
        if pos < self.num_owned:
            rest.append((pos, self.num_owned))
        step = torch.tensor(float(t), dtype=torch.float32, device=p.device)
        for runs, wd in ((decay, s.weight_decay), (rest, 0.0)):
            if not runs:
                continue

            def views(x, runs=runs):
                return [x[a:b] for a, b in runs]

            torch._fused_adamw_(views(p), views(g), views(self.exp_avg), views(self.exp_avg_sq), [],
                                [step] * len(runs), lr=lr, beta1=s.beta1, beta2=s.beta2, weight_decay=wd,
                                eps=s.eps, amsgrad=False, maximize=False)

    def _write_back(self) -> None:
        from executor import comm

        if not self.zero1 and len(self.pieces) == 1 and self.master.device == self.params.device:
            a, b = self.pieces[0]
            self.params[a:b].copy_(self.master)  # cast while copying: no temporary
            return
        owned = self.master.to(self.params.device, dtype=self.params.dtype, non_blocking=True)
        if not self.zero1:
            self._scatter_owned(self.params, owned)
            return
        off = 0
        for b, (a, z) in zip(self.buckets, self.pieces, strict=True):
            parts = comm.all_gather_list(owned[off:off + z - a].contiguous(), self.dp.group)
            self.params[b.start:b.stop].copy_(torch.cat(parts))
            off += z - a

    # -- offload and state -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.master is not self.params:
            out["master"] = self.master
        return out

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, **{k: v.detach().cpu().clone() for k, v in self.state_tensors().items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        for k, v in self.state_tensors().items():
            v.copy_(state[k])
        if "master" in self.state_tensors():
            self._write_back()


#: Elements per fp32 partial sum of ``sum_of_squares`` on CUDA.
_NORM_ROW = 4096


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """sum(x²) of a 1-d fp32 tensor as an fp64 scalar, with no full-size temporary.

    CUDA: fp32 norms of rows of ``_NORM_ROW`` elements (one pass over x, one kernel), their squares summed
    in fp64 — relative error ~1e-7, deterministic. Elsewhere: fp64 sums over chunks of ``_NORM_CHUNK``."""
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    if x.is_cuda:
        n = x.numel() // _NORM_ROW * _NORM_ROW
        if n:
            sq += torch.linalg.vector_norm(x[:n].view(-1, _NORM_ROW), dim=1).double().square().sum()
        if n < x.numel():
            sq += torch.linalg.vector_norm(x[n:], dtype=torch.float64).square()
        return sq
    for c in range(0, x.numel(), _NORM_CHUNK):
        y = x[c:c + _NORM_CHUNK]
        sq += torch.sum(y * y, dtype=torch.float64)
    return sq


def reduce_in_one(tensors: Sequence[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Sum-reduce several tensors with one collective: pack, reduce, unpack in place."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    reduce(flat)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (pinned when ``t`` is on a GPU, so the copy back is asynchronous)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    out.copy_(t)
    return out



def release_library_workspaces(device: torch.device) -> None:
    """Give back the cuBLAS workspaces cached per (handle, stream) — 32 MiB each on Hopper, allocated through
    torch's allocator — so memory left between calls is only what a call needs; the next product takes a
    workspace again (from the allocator's cache: no cudaMalloc)."""
    if device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
