"""Log-probabilities and losses on vocabulary shards: the full-vocabulary logits are never gathered.

tp rank r holds logit columns ``[s, s + W)`` of the padded vocabulary V' (s = r W, W = V'/tp). For row n
with target token y_n (a global id), z = logits / temperature, and columns removed by the generation's
logits mask or beyond the real vocabulary V set to finfo(fp32).min (as ``reallm.algorithms.functional``)::

    l_n   = log sum_j exp(z[n, j])            this shard's logsumexp (one fused pass per chunk of rows)
    M_n   = max over tp of l_n                                      all-reduce MAX   [N]
    S_n   = sum over tp of exp(l_n - M_n)                           all-reduce SUM   [N]   } one
    zy_n  = sum over tp of (z[n, y_n - s] if s <= y_n < s + W else 0)                   } all-reduce
    logp_n = zy_n - (M_n + log S_n)

Backward needs no communication: every tp rank computes the same loss, and the gradient of logp_n with
respect to its own columns is ``g_n (onehot(y_n - s) - exp(z - lse_n)) / temperature`` (masked columns:
exp(finfo.min - lse) = 0). Rows are processed in chunks in both passes, so beyond the logits and their
gradient one fp32 ``[chunk, W]`` buffer is alive, as in ``functional.gather_logprobs_chunked``. With
``fused`` (compiled models on CUDA) each chunk's pass is one torch.compile'd kernel that reads the bf16
logits once, instead of a dozen eager kernels over fp32 copies.

Without autograd (inference calls) a shard may hold the normed hidden states and this rank's LM head rows
instead of the logits (``LogitsShard.hidden``): each chunk's logits are then made by one product and
dropped (``hidden_target_logprobs``), so the [T, W] logits never exist at once.

Layouts follow the two conventions the codebase uses: ``LogitsShard.logprobs`` returns the *shifted*
layout [N = T - B] of ``reallm.algorithms.functional`` (entry k of sequence i: log-prob of token k+1);
``LogitsShard.row_logprobs`` the row layout [T] of ``reallm.model.losses`` (row t: token t+1, 0 on each
sequence's last row). With tp = 1 both equal their single-process counterparts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from reallm.parallel.groups import AxisGroup

DEFAULT_CHUNK_ROWS = 1024


def _prepared(logits: torch.Tensor, temperature: float, removed: Optional[torch.Tensor], vocab_start: int,
              vocab_size: int) -> torch.Tensor:
    """fp32 shard / temperature with removed columns and padded vocabulary at finfo(fp32).min."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lowest = torch.finfo(torch.float32).min
    W = z.shape[-1]
    if removed is not None:
        cols = removed[..., vocab_start:vocab_start + W]
        if cols.shape[-1] < W:
            cols = torch.nn.functional.pad(cols, (0, W - cols.shape[-1]), value=False)
        z = z.masked_fill(cols.bool(), lowest)
    first_pad = vocab_size - vocab_start
    if first_pad < W:
        col = torch.arange(W, device=z.device)
        z = z.masked_fill(col >= max(first_pad, 0), lowest)
    return z


def _chunk_stats(logits_TW: torch.Tensor, rows_c: torch.Tensor, target_c: torch.Tensor, inside_c: torch.Tensor,
                 removed_cV: Optional[torch.Tensor], temperature: float, vocab_start: int,
                 vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of rows: (this shard's logsumexp [c], the target's logit where it lies here, else 0 [c]).
    One read of the logits; compiled on CUDA into a single fused reduction."""
    return _stats_of(logits_TW.index_select(0, rows_c), target_c, inside_c, removed_cV, temperature, vocab_start,
                     vocab_size)


def _chunk_stats_from_hidden(hidden_TH: torch.Tensor, head_WH: torch.Tensor, rows_c: torch.Tensor,
                             target_c: torch.Tensor, inside_c: torch.Tensor, removed_cV: Optional[torch.Tensor],
                             temperature: float, vocab_start: int,
                             vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chunk_stats`` of the chunk's logits made here from the normed hidden states and the LM head shard
    (``LogitsShard`` without logits): only ``[c, W]`` of them exist at a time."""
    logits = torch.nn.functional.linear(hidden_TH.index_select(0, rows_c), head_WH)
    return _stats_of(logits, target_c, inside_c, removed_cV, temperature, vocab_start, vocab_size)


def _stats_of(logits_cW: torch.Tensor, target_c: torch.Tensor, inside_c: torch.Tensor,
              removed_cV: Optional[torch.Tensor], temperature: float, vocab_start: int,
              vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = _prepared(logits_cW, temperature, removed_cV, vocab_start, vocab_size)
    m = z.amax(-1)
    lse = m + torch.log(torch.exp(z - m[:, None]).sum(-1))
    zy = z.gather(-1, target_c[:, None]).squeeze(-1)
    return lse, torch.where(inside_c, zy, 0.0)


def _chunk_grad(logits_TW: torch.Tensor, rows_c: torch.Tensor, target_c: torch.Tensor, inside_c: torch.Tensor,
                removed_cV: Optional[torch.Tensor], lse_c: torch.Tensor, g_c: torch.Tensor, temperature: float,
                vocab_start: int, vocab_size: int) -> torch.Tensor:
    """d logp / d logits of one chunk, times the incoming gradient, in the logits' dtype [c, W]."""
    z = _prepared(logits_TW.index_select(0, rows_c), temperature, removed_cV, vocab_start, vocab_size)
    col = torch.arange(z.shape[-1], device=z.device)
    onehot = (col[None, :] == target_c[:, None]) & inside_c[:, None]
    gz = (onehot.float() - torch.exp(z - lse_c[:, None])) * (g_c.float() / temperature)[:, None]
    return gz.to(logits_TW.dtype)


_FUSED: dict = {}


def _maybe_fused(fn, fused: bool):
    """``fn`` compiled (one fused kernel per pass) when ``fused``, else eager."""
    if not fused:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)
    return _FUSED[fn]


def _target_logprobs(stats, sources: tuple, W: int, rows_N, targets_N, temperature, removed_TV, vocab_start,
                     vocab_size, chunk_rows, tp, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of the module docstring, chunk by chunk: ``stats(*sources, rows, ...)`` gives a
    chunk's shard logsumexp and target logit. Returns (logp [N], lse [N], safe local targets, inside)."""
    N = rows_N.shape[0]
    local_target = targets_N - vocab_start
    inside = (local_target >= 0) & (local_target < W)
    safe_target = local_target.clamp(0, max(W - 1, 0))
    local_lse = torch.empty(N, dtype=torch.float32, device=dev)
    sums = torch.zeros(2, N, dtype=torch.float32, device=dev)
    for a in range(0, N, chunk_rows):
        b = min(a + chunk_rows, N)
        r = rows_N[a:b]
        removed = None if removed_TV is None else removed_TV.index_select(0, r)
        if W:
            local_lse[a:b], sums[1, a:b] = stats(*sources, r, safe_target[a:b], inside[a:b], removed, temperature,
                                                 vocab_start, vocab_size)
        else:
            local_lse[a:b] = float("-inf")
    # lse = log sum over tp of exp(lse_r): the max, then one all-reduce of (sum, target logit)
    gmax = tp.all_reduce_max(local_lse.clone())
    sums[0] = torch.exp(local_lse - gmax)
    tp.all_reduce(sums)
    lse = gmax + torch.log(sums[0])
    return sums[1] - lse, lse, safe_target, inside


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TW, rows_N, targets_N, temperature, removed_TV, vocab_start, vocab_size, chunk_rows,
                tp, fused):
        logp, lse, safe_target, inside = _target_logprobs(
            _maybe_fused(_chunk_stats, fused), (logits_TW,), logits_TW.shape[-1], rows_N, targets_N, temperature,
            removed_TV, vocab_start, vocab_size, chunk_rows, tp, logits_TW.device)
        ctx.save_for_backward(logits_TW, rows_N, safe_target, inside, lse,
                              *(() if removed_TV is None else (removed_TV,)))
        ctx.args = (temperature, vocab_start, vocab_size, chunk_rows, removed_TV is not None, fused)
        return logp

    @staticmethod
    def backward(ctx, grad_N):
        logits_TW, rows_N, safe_target, inside, lse, *rest = ctx.saved_tensors
        temperature, vocab_start, vocab_size, c, has_mask, fused = ctx.args
        removed_TV = rest[0] if has_mask else None
        grad_fn = _maybe_fused(_chunk_grad, fused)
        grad = torch.zeros_like(logits_TW)
        for a in range(0, rows_N.shape[0], c):
            r = rows_N[a:a + c]
            removed = None if removed_TV is None else removed_TV.index_select(0, r)
            grad.index_copy_(0, r, grad_fn(logits_TW, r, safe_target[a:a + c], inside[a:a + c], removed,
                                           lse[a:a + c], grad_N[a:a + c], temperature, vocab_start, vocab_size))
        return grad, None, None, None, None, None, None, None, None, None


def vocab_parallel_target_logprobs(logits_TW: torch.Tensor, rows_N: torch.Tensor, targets_N: torch.Tensor, *,
                                   tp: AxisGroup, vocab_start: int, vocab_size: int, temperature: float = 1.0,
                                   logits_mask: Optional[torch.Tensor] = None,
                                   chunk_rows: int = DEFAULT_CHUNK_ROWS, fused: bool = False) -> torch.Tensor:
    """log_softmax over the whole (masked) vocabulary of logits row ``rows_N[n]``, at global id
    ``targets_N[n]``; fp32 [N], differentiable (module docstring). ``logits_mask`` [T, V or V'] is global.
    ``fused``: each chunk's pass as one torch.compile'd kernel (CUDA)."""
    mask = None if logits_mask is None else logits_mask.bool()
    return _VocabParallelLogProbs.apply(logits_TW, rows_N.long(), targets_N.long(), float(temperature), mask,
                                        int(vocab_start), int(vocab_size), int(chunk_rows), tp,
                                        bool(fused and logits_TW.is_cuda))


@torch.no_grad()
def hidden_target_logprobs(hidden_TH: torch.Tensor, head_WH: torch.Tensor, rows_N: torch.Tensor,
                           targets_N: torch.Tensor, *, tp: AxisGroup, vocab_start: int, vocab_size: int,
                           temperature: float = 1.0, logits_mask: Optional[torch.Tensor] = None,
                           chunk_rows: int = DEFAULT_CHUNK_ROWS, fused: bool = False) -> torch.Tensor:
    """``vocab_parallel_target_logprobs`` of the logits ``hidden_TH @ head_WH^T``, made a chunk of rows at a
    time (no autograd): the same values without the [T, W] logits."""
    mask = None if logits_mask is None else logits_mask.bool()
    stats = _maybe_fused(_chunk_stats_from_hidden, bool(fused and hidden_TH.is_cuda))
    logp, *_ = _target_logprobs(stats, (hidden_TH, head_WH), head_WH.shape[0], rows_N.long(), targets_N.long(),
                                float(temperature), mask, int(vocab_start), int(vocab_size), int(chunk_rows), tp,
                                hidden_TH.device)
    return logp


def _shifted_rows(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token index of each shifted entry (rows 0..L-2 of every sequence), int64 [T - B]."""
    cu = cu_seqlens.long()
    B = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    short = lens - 1
    seg = torch.repeat_interleave(torch.arange(B, device=cu.device), short.clamp(min=0),
                                  output_size=num_tokens - B)
    short_cu = cu - torch.arange(B + 1, device=cu.device)
    return torch.arange(num_tokens - B, device=cu.device) - short_cu[seg] + cu[seg]


@dataclass
class LogitsShard:
    """What the last stage of an actor returns: this tp rank's columns of the logits, and how to use them.

    ``logits`` is ``[T, W]``: columns ``[vocab_start, vocab_start + W)`` of the padded vocabulary (W = V'/tp;
    with tp = 1 the whole vocabulary). Columns >= ``vocab_size`` are padding (zero weights) and are masked
    by every method here."""

    logits: Optional[torch.Tensor]
    vocab_start: int
    vocab_size: int
    tp: AxisGroup
    #: Compile each chunk's pass into one fused kernel (set by compiled models on CUDA).
    fused: bool = False
    #: Without ``logits`` (inference: ``ParallelModel._lazy_head``): the normed hidden states ``[T, h]`` (all
    #: tokens, every tp rank) and this rank's LM head rows ``[W, h]``; log-probs make the logits a chunk of
    #: rows at a time.
    hidden: Optional[torch.Tensor] = None
    head_weight: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return (self.logits if self.logits is not None else self.hidden).shape[0]

    def local_logits(self) -> torch.Tensor:
        """This rank's ``[T, W]`` logits (made whole here for a shard that holds hidden states)."""
        if self.logits is not None:
            return self.logits
        return torch.nn.functional.linear(self.hidden, self.head_weight)

    def logprobs(self, tokens_T: torch.Tensor, cu_seqlens: torch.Tensor, *, temperature: float = 1.0,
                 logits_mask: Optional[torch.Tensor] = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
        """Shifted layout [N = T - B] (``functional.gather_logprobs``): log-prob of token k+1 of each sequence."""
        T = tokens_T.shape[0]
        rows = _shifted_rows(cu_seqlens.to(tokens_T.device), T)
        targets = tokens_T.long()[rows + 1]
        if self.logits is None:
            return hidden_target_logprobs(self.hidden, self.head_weight, rows, targets, tp=self.tp,
                                          vocab_start=self.vocab_start, vocab_size=self.vocab_size,
                                          temperature=temperature, logits_mask=logits_mask, chunk_rows=chunk_rows,
                                          fused=self.fused)
        return vocab_parallel_target_logprobs(self.logits, rows, targets, tp=self.tp, vocab_start=self.vocab_start,
                                              vocab_size=self.vocab_size, temperature=temperature,
                                              logits_mask=logits_mask, chunk_rows=chunk_rows, fused=self.fused)

    def row_logprobs(self, tokens_T: torch.Tensor, cu_seqlens: torch.Tensor, *, temperature: float = 1.0,
                     logits_mask: Optional[torch.Tensor] = None,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
        """Row layout [T] (``reallm.model.losses.packed_logprobs``): row t is token t+1, 0 on last rows."""
        T = tokens_T.shape[0]
        rows = _shifted_rows(cu_seqlens.to(tokens_T.device), T)
        lp = self.logprobs(tokens_T, cu_seqlens, temperature=temperature, logits_mask=logits_mask,
                           chunk_rows=chunk_rows)
        return torch.zeros(T, dtype=lp.dtype, device=lp.device).index_put((rows,), lp)

    def full(self) -> torch.Tensor:
        """All-gathered ``[T, V]`` logits (tests and debugging only: the point of this class is not to)."""
        return self.tp.all_gather(self.local_logits(), dim=-1)[:, :self.vocab_size]


def sft_loss(out: LogitsShard, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """``reallm.model.losses.sft_loss`` on a logits shard: answer-token NLL / ``num_answer_tokens_global``."""
    from reallm.model.losses import answer_loss_mask

    tokens, cu = batch["tokens"], batch["cu_seqlens"]
    mask = answer_loss_mask(tokens, cu, batch["prompt_mask"])
    lp = out.row_logprobs(tokens, cu)
    nll_sum = -(lp * mask).sum()
    loss = nll_sum / float(batch["num_answer_tokens_global"])
    return loss, {"nll_sum": float(nll_sum.detach()), "num_tokens": float(mask.sum())}


def gather_last_logits(shard_BW: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    """Full padded-vocabulary logits ``[B, V']`` of a few positions (generation's sampling step only)."""
    return tp.all_gather(shard_BW.contiguous(), dim=-1)
