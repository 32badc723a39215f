"""Packed log-probabilities and the standard losses, as ``loss_fn(outputs, batch) -> (loss, stats)``.

Convention for packed sequences (tokens ``[T]``, ``cu_seqlens`` ``[B+1]``): row t of the logits predicts
token t+1 of the *same* sequence, so per sequence of length L rows 0..L-2 carry a target and the last
row carries none (its log-prob is reported as 0)::

    logp[t] = log_softmax(z[t] / temperature, masked)[tokens[t+1]]     (0 at each sequence's last row)

with ``masked``: entries where ``logits_mask[t]`` is True set to -inf (the support the token was drawn
from during generation). ``packed_logprobs`` never materialises the fp32 ``[T, V]`` softmax: an autograd
function processes rows in chunks in both passes and keeps only the per-row log-sum-exp ``[T]``, so the
memory beyond the logits themselves is one chunk of fp32 (plus the gradient of the logits in backward).

SFT: next-token cross entropy on answer tokens only, summed and divided by the *global* number of answer
tokens of the step (over all micro-batches and dp ranks), so the gradient does not depend on how the
batch was split::

    loss = - sum_{t : tokens[t+1] is an answer token} logp[t] / num_answer_tokens_global
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import torch

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]

#: Rows per chunk in ``packed_logprobs`` (x V fp32 values alive at a time).
DEFAULT_CHUNK_ROWS = 1024


def shifted_targets(tokens_T: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target [T] = tokens[t+1] or 0, valid [T] = row t has a target in its own sequence)."""
    T = tokens_T.shape[0]
    valid = torch.ones(T, dtype=torch.bool, device=tokens_T.device)
    ends = cu_seqlens[1:].to(device=tokens_T.device, dtype=torch.int64) - 1
    valid[ends[ends >= 0]] = False
    target = torch.zeros_like(tokens_T)
    target[:-1] = tokens_T[1:]
    return target, valid


class _TargetLogProbs(torch.autograd.Function):
    """logp[n] = log_softmax(z[n] / temp with mask)[target[n]], chunked over rows in forward and backward."""

    @staticmethod
    def forward(ctx, logits_NV, target_N, temperature, mask_NV, chunk_rows):
        N = logits_NV.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        out = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        c = chunk_rows
        for a in range(0, N, c):
            z = _scaled(logits_NV[a:a + c], temperature, None if mask_NV is None else mask_NV[a:a + c])
            lse[a:a + c] = torch.logsumexp(z, -1)
            out[a:a + c] = z.gather(-1, target_N[a:a + c, None]).squeeze(-1) - lse[a:a + c]
        ctx.save_for_backward(logits_NV, target_N, lse, mask_NV if mask_NV is not None else torch.empty(0))
        ctx.temperature, ctx.chunk_rows, ctx.has_mask = temperature, chunk_rows, mask_NV is not None
        return out

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, target_N, lse, mask_NV = ctx.saved_tensors
        mask_NV = mask_NV if ctx.has_mask else None
        grad = torch.empty_like(logits_NV)
        c = ctx.chunk_rows
        for a in range(0, logits_NV.shape[0], c):
            m = None if mask_NV is None else mask_NV[a:a + c]
            z = _scaled(logits_NV[a:a + c], ctx.temperature, m)
            g = grad_N[a:a + c].float()
            # d logp / dz = onehot(target) - softmax(z); chain through z = logits / temp.
            gz = -torch.exp(z - lse[a:a + c, None]) * g[:, None]
            gz.scatter_add_(-1, target_N[a:a + c, None], g[:, None])
            if m is not None:
                gz.masked_fill_(m, 0.0)
            grad[a:a + c] = (gz / ctx.temperature).to(grad.dtype)
        return grad, None, None, None, None


def _scaled(logits: torch.Tensor, temperature: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    if mask is not None:
        z = z.masked_fill(mask, float("-inf"))
    return z


def target_logprobs(logits_NV: torch.Tensor, target_N: torch.Tensor, *, temperature: float = 1.0,
                    logits_mask_NV: Optional[torch.Tensor] = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """log_softmax(logits / temperature, masked)[target] per row, fp32 [N], differentiable, chunked."""
    return _TargetLogProbs.apply(logits_NV, target_N, float(temperature), logits_mask_NV, int(chunk_rows))


def packed_logprobs(logits_TV: torch.Tensor, tokens_T: torch.Tensor, cu_seqlens: torch.Tensor, *,
                    temperature: float = 1.0, logits_mask_TV: Optional[torch.Tensor] = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Row t: log-prob of token t+1 of its sequence (0 at each sequence's last row), fp32 [T]."""
    target, valid = shifted_targets(tokens_T, cu_seqlens)
    lp = target_logprobs(logits_TV, target, temperature=temperature, logits_mask_NV=logits_mask_TV,
                         chunk_rows=chunk_rows)
    return lp * valid


def answer_loss_mask(tokens_T: torch.Tensor, cu_seqlens: torch.Tensor, prompt_mask_T: torch.Tensor) -> torch.Tensor:
    """[T] bool: row t counts in the SFT loss iff token t+1 is in its sequence and is an answer token."""
    _, valid = shifted_targets(tokens_T, cu_seqlens)
    nxt_is_answer = torch.zeros_like(valid)
    nxt_is_answer[:-1] = ~prompt_mask_T[1:].bool()
    return valid & nxt_is_answer


def sft_loss(logits_TV: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT loss (module docstring). ``batch``: tokens, cu_seqlens, prompt_mask [T] bool, and
    num_answer_tokens_global (the denominator, over the whole step)."""
    tokens, cu = batch["tokens"], batch["cu_seqlens"]
    mask = answer_loss_mask(tokens, cu, batch["prompt_mask"])
    lp = packed_logprobs(logits_TV, tokens, cu)
    denom = float(batch["num_answer_tokens_global"])
    nll_sum = -(lp * mask).sum()
    loss = nll_sum / denom
    n = int(mask.sum())
    return loss, {"nll_sum": float(nll_sum.detach()), "num_tokens": float(n)}


def num_answer_tokens(tokens_T: torch.Tensor, cu_seqlens: torch.Tensor, prompt_mask_T: torch.Tensor) -> int:
    """Rows counted by ``sft_loss`` in one packed batch (sum this over the step for the denominator)."""
    return int(answer_loss_mask(tokens_T, cu_seqlens, prompt_mask_T).sum())
