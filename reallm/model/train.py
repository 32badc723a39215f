"""One training step of a whole (single-stage) model: forward/backward over micro-batches, then the update.

Losses are pluggable: ``loss_fn(outputs, batch) -> (loss, stats)`` where ``outputs`` is what the model's
last stage returns (logits ``[T, V]`` or values ``[T]``) and ``batch`` the micro-batch dict (``tokens``,
``cu_seqlens`` and whatever the loss reads). Losses normalise by *global* counts carried in the batch,
so the per-micro-batch gradients simply add up and the result does not depend on the split.
The pipeline-parallel version lives in ``reallm.parallel``; it reuses the same loss functions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from reallm.model.losses import LossFn
from reallm.model.optim import MixedPrecisionAdamW
from reallm.model.transformer import Transformer


def forward_backward(model: Transformer, micro_batches: Sequence[Mapping[str, torch.Tensor]],
                     loss_fn: LossFn) -> dict[str, float]:
    """Accumulate gradients of sum over micro-batches of ``loss_fn``; returns summed stats (+ ``loss``)."""
    totals: dict[str, float] = defaultdict(float)
    for mb in micro_batches:
        out = model(mb["tokens"], mb["cu_seqlens"])
        loss, stats = loss_fn(out, mb)
        loss.backward()
        totals["loss"] += float(loss.detach())
        for k, v in stats.items():
            totals[k] += float(v)
    return dict(totals)


def train_step(model: Transformer, optimizer: MixedPrecisionAdamW, micro_batches: Sequence[Mapping[str, torch.Tensor]],
               loss_fn: LossFn, *, norm_sq_reduce=None) -> dict[str, float]:
    """zero_grad, forward/backward every micro-batch, clip and update. Returns loss/grad-norm/lr stats."""
    model.train()
    optimizer.zero_grad()
    stats = forward_backward(model, micro_batches, loss_fn)
    stats.update(optimizer.step(norm_sq_reduce))
    return stats


@torch.no_grad()
def evaluate(model: Transformer, micro_batches: Sequence[Mapping[str, torch.Tensor]],
             loss_fn: LossFn) -> dict[str, float]:
    """Summed loss and stats without gradients."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = defaultdict(float)
    for mb in micro_batches:
        loss, stats = loss_fn(model(mb["tokens"], mb["cu_seqlens"]), mb)
        totals["loss"] += float(loss)
        for k, v in stats.items():
            totals[k] += float(v)
    model.train(was_training)
    return dict(totals)


def set_gradient_checkpointing(model: Transformer, enabled: bool = True) -> None:
    model.gradient_checkpointing = enabled


def sft_micro_batch(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], num_answer_tokens_global: Optional[int]
                    = None, device=None) -> dict[str, torch.Tensor]:
    """A packed SFT micro-batch from full token lists (prompt + answer) and their prompt lengths."""
    from reallm.model.losses import num_answer_tokens
    from reallm.model.transformer import pack_sequences

    tokens, cu = pack_sequences(seqs, device=device)
    prompt_mask = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for s, n in zip(cu[:-1].tolist(), prompt_lens, strict=True):
        prompt_mask[s:s + n] = True
    n_global = num_answer_tokens_global
    if n_global is None:
        n_global = num_answer_tokens(tokens, cu, prompt_mask)
    return {"tokens": tokens, "cu_seqlens": cu, "prompt_mask": prompt_mask,
            "num_answer_tokens_global": torch.tensor(float(n_global))}
