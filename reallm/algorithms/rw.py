"""The ``rw`` experiment: a Bradley–Terry reward model over (chosen, rejected) answer pairs.

The critic (``*ForTokenClassification``: the causal-LM body with a scalar ``score`` head, initialised from
the seed when the checkpoint has none) scores a sequence by its value at the last token
(``functional.last_token_values``). Per step, over the P pairs of the step's ``train_bs_n_seqs`` prompts
(up to ``max_pairs_per_prompt`` each, re-sampled per epoch with the seed)::

    loss = Σ_p −log σ(s_chosen − s_rejected) / P            (functional.rw_loss, P global)

Pairs never straddle dp ranks or micro-batches (``reallm.algorithms.paired``), so each piece's loss is its
share of the global mean and the dp gradient sum is the gradient of the global loss. Every
``eval_freq_epochs`` epochs: loss and pairwise accuracy (#{s_c > s_r} / P) on the held-out pairs. HF
checkpoints (loadable as ``*ForTokenClassification``, ``num_labels=1``) go to ``checkpoints/default/step{N}/``;
recovery state (``recover_mode``) is the critic alone, the data position being the step.
"""

from __future__ import annotations

from typing import Optional

import torch

from executor import comm
from executor.data import SeqBatch
from executor.runtime import CallContext
from reallm.algorithms import functional as F
from reallm.algorithms.base import ModelHandle
from reallm.algorithms.data import load_tokenizer
from reallm.algorithms.paired import PairedData, PairedRuntime, batch_micro_batches, eval_now, sum_stats
from reallm.errors import UserError
from reallm.plan import Plan

STAT_KEYS = ("num_pairs", "loss_sum", "correct_count", "pos_score_sum", "neg_score_sum")


def rw_loss_fn(values_T: torch.Tensor, mb: dict):
    scores = F.last_token_values(values_T, mb["cu_seqlens"])
    return F.rw_loss(scores, mb["chosen_index"], mb["rejected_index"], num_pairs=mb["num_pairs"])


class RWRuntime(PairedRuntime):
    experiment = "rw"
    supports_recovery = True  # the critic is all the state: the data position is the step

    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        super().__init__(plan, rank, device, plan_path)
        self.data = PairedData(self.cfg, load_tokenizer(self.cfg.model.path))
        self.model: Optional[ModelHandle] = None

    @classmethod
    def check_plan(cls, plan: Plan) -> None:
        if not plan.models["default"].is_critic:
            raise UserError("rw: the reward model must be a critic (model.type.is_critic=True)")
        super().check_plan(plan)

    def _model(self, ctx: CallContext) -> ModelHandle:
        return self.trained_model(ctx, self.cfg.model)

    def run_call(self, ctx: CallContext, batch: SeqBatch):
        model = self._model(ctx)
        mbs = batch_micro_batches(batch, ctx.placement.num_micro_batches, self.data.num_pairs(ctx.step), self.device)
        stats = model.train_step([mb for _, mb in mbs], rw_loss_fn)  # the same on every rank: summed over dp
        out = {k: stats.get(k, 0.0) for k in ("loss", *STAT_KEYS)}
        out.update(lr=stats["lr"], grad_norm=stats["grad_norm"],
                   num_tokens=float(sum(self.data.step_sequences(ctx.step)[1])))
        if eval_now(self.cfg, bool(self.data.valid), *self.epoch_end(ctx.step)):
            out.update(self.evaluate(ctx))
        if self.checkpoint_due(ctx.step):
            model.save_hf(self.checkpoint_path("default", ctx.step + 1))
        return None, out

    @torch.no_grad()
    def evaluate(self, ctx: CallContext) -> dict:
        """Loss and pairwise accuracy over all held-out pairs; each dp replica scores a contiguous share (the
        figures are right on the last pipeline stage, which holds the dp heads)."""
        model = self._model(ctx)
        mbs = self.data.valid_micro_batches(ctx)
        parts = model.forward(mbs, post=lambda values, mb: rw_loss_fn(values, mb)[1]) if mbs else []
        s = sum_stats(parts or [], STAT_KEYS, lambda t: comm.all_reduce(t, ctx.dp))
        n = max(s["num_pairs"], 1.0)
        return {"valid_loss": s["loss_sum"] / n, "valid_accuracy": s["correct_count"] / n,
                "valid_pos_score": s["pos_score_sum"] / n, "valid_neg_score": s["neg_score_sum"] / n}

    def on_results(self, step: int, call: str, by_head: list) -> None:
        stats = [s for _, s in by_head]  # every head reports the same global figures
        tot = stats[0]
        n = max(tot["num_pairs"], 1.0)
        fig = {"loss": tot["loss"], "accuracy": tot["correct_count"] / n, "pos_score": tot["pos_score_sum"] / n,
               "neg_score": tot["neg_score_sum"] / n, "lr": tot["lr"], "grad_norm": tot["grad_norm"],
               "num_pairs": tot["num_pairs"], "num_tokens": tot["num_tokens"],
               "time_s": max(s["time_s"] for s in stats)}
        fig["tokens_per_s"] = fig["num_tokens"] / max(fig["time_s"], 1e-9)
        fig.update({k: v for k, v in stats[0].items() if k.startswith("valid_")})
        self.record(step, fig)


RUNTIME = RWRuntime
