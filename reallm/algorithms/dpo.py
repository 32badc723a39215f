"""The ``dpo`` experiment: ``ref_inf`` → ``actor_train`` (Direct Preference Optimization, Rafailov et al. 2023).

Per sequence, S = Σ of answer-token log-probs (``functional.sequence_logprobs`` over ``action_mask``; the
prompt's tokens are not scored). ``ref_inf`` computes S^ref with the frozen reference model on its own
placement and outputs it as ``seqlogp`` (one row per sequence); the executor moves it to ``actor_train``'s
placement, whose dp split is the same as its dataset keys' (both balanced by tokens, pairs kept whole:
``reallm.algorithms.paired``). Over the step's P pairs (global count)::

    m_p  = β ((S^π_c − S^ref_c) − (S^π_r − S^ref_r))          (functional.dpo_loss, β = ``beta``)
    loss = Σ_p −log σ(m_p) / P

Logged per step: loss, ``reward_margin`` = mean m_p (the chosen-minus-rejected implicit-reward margin,
policy vs ref), ``accuracy`` = #{m_p > 0} / P, the mean chosen / rejected implicit rewards, and
``logp_margin`` = mean (S^π_c − S^π_r). Every ``eval_freq_epochs`` epochs, on the held-out pairs:
``valid_logp_margin`` = mean (S^π_c − S^π_r) and ``valid_accuracy`` = #{S^π_c > S^π_r} / P; ``ref_inf``
measures the reference's ``ref_valid_logp_margin`` and ``ref_valid_accuracy`` once per run (its first step;
the reference never changes), and rank 0 reports ``valid_reward_margin`` = β (valid_logp_margin − ref_valid_logp_margin),
the held-out mean of m_p.
Actor checkpoints (HF ``*ForCausalLM``) go to ``checkpoints/actor/step{N}/``.
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

TRAIN_KEYS = ("num_pairs", "loss_sum", "margin_sum", "correct_count", "chosen_reward_sum", "rejected_reward_sum",
              "logp_margin_sum")
VALID_KEYS = ("num_pairs", "logp_margin_sum", "correct_count")


def seq_logps(out, mb: dict) -> torch.Tensor:
    """S [B]: Σ answer-token log-probs per sequence, from a (vocab-parallel) logits shard."""
    cu = mb["cu_seqlens"]
    lp = out.logprobs(mb["tokens"], cu)
    return F.sequence_logprobs(lp, F.action_mask(mb["prompt_mask"], cu).to(lp.device), cu.to(lp.device))


def pair_logp_stats(out, mb: dict) -> dict:
    s = seq_logps(out, mb).double()
    d = s[mb["chosen_index"]] - s[mb["rejected_index"]]
    return {"num_pairs": torch.tensor(float(d.numel())), "logp_margin_sum": d.sum(), "correct_count": (d > 0).sum()}


def make_dpo_loss(beta: float):
    def loss_fn(out, mb: dict):
        s = seq_logps(out, mb)
        c, r = mb["chosen_index"], mb["rejected_index"]
        loss, stats = F.dpo_loss(s, mb["ref_seqlogp"].to(s.device), c, r, beta=beta, num_pairs=mb["num_pairs"])
        stats["logp_margin_sum"] = (s[c] - s[r]).detach().double().sum()
        return loss, stats

    return loss_fn


class DPORuntime(PairedRuntime):
    experiment = "dpo"
    supports_recovery = True  # the actor is all the state (the reference is frozen; the data position is the step)

    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        super().__init__(plan, rank, device, plan_path)
        self.data = PairedData(self.cfg, load_tokenizer(self.cfg.actor.path))
        self.models: dict[str, ModelHandle] = {}  # role → handle on this rank
        self.ref_valid_margin: Optional[float] = None  # rank 0

    @classmethod
    def check_plan(cls, plan: Plan) -> None:
        bad = [r for r in ("actor", "ref") if plan.models[r].is_critic]
        if bad:
            raise UserError(f"dpo: {' and '.join(bad)} must be causal LMs (type.is_critic=False)")
        super().check_plan(plan)

    def _model(self, ctx: CallContext) -> ModelHandle:
        role = ctx.call.role
        if role not in self.models:
            if role == "actor":
                self.models[role] = self.track(role, ModelHandle.build(
                    ctx, self.cfg.actor, self.cfg.seed, trainable=True, total_steps=self.num_steps(),
                    train_resident=self.keeps_train_resident("actor_train")))
            else:  # the reference is never trained, whatever its optimizer says
                self.models[role] = ModelHandle.build(ctx, self.cfg.ref, self.cfg.seed, trainable=False,
                                                      inference_graphs=self.keeps_frozen_resident(role))
        handle = self.models[role]
        if handle.pm.offloaded:
            handle.pm.reload()
        return handle

    def run_call(self, ctx: CallContext, batch: SeqBatch):
        if ctx.call.name != "ref_inf":
            return self._actor_train(ctx, batch)
        out = self._ref_inf(ctx, batch)
        if self.cfg.memory.offload_frozen_models and self.shares_devices("ref"):
            self.models["ref"].pm.offload()  # the frozen reference waits in host memory until its next call
        return out

    @torch.no_grad()
    def _ref_inf(self, ctx: CallContext, batch: SeqBatch):
        model = self._model(ctx)
        mbs = batch_micro_batches(batch, ctx.placement.num_micro_batches, 1, self.device)
        per_mb = model.forward([mb for _, mb in mbs], post=seq_logps) if mbs else []
        stats: dict = {}
        if ctx.step == self.first_step() and self.data.valid and self.cfg.eval_freq_epochs:  # once per run
            stats.update({f"ref_{k}": v for k, v in self.valid_margin(ctx).items()})
        if per_mb is None:  # not the last pipeline stage: the dp head holds the outputs
            return None, stats
        seqlogp = torch.zeros(len(batch), dtype=torch.float32, device=self.device)  # NCCL sends device tensors
        for (positions, _), s in zip(mbs, per_mb):
            seqlogp[positions] = s.float()
        return SeqBatch(batch.ids, {"seqlogp": seqlogp}, {"seqlogp": [1] * len(batch)}), stats

    def _actor_train(self, ctx: CallContext, batch: SeqBatch):
        model = self._model(ctx)
        mbs = batch_micro_batches(batch, ctx.placement.num_micro_batches, self.data.num_pairs(ctx.step), self.device)
        for positions, mb in mbs:
            mb["ref_seqlogp"] = batch.data["seqlogp"][positions].to(self.device)
        stats = model.train_step([mb for _, mb in mbs], make_dpo_loss(self.cfg.beta))  # global sums, every rank
        out = {k: stats.get(k, 0.0) for k in ("loss", *TRAIN_KEYS)}
        out.update(lr=stats["lr"], grad_norm=stats["grad_norm"],
                   num_tokens=float(sum(self.data.step_sequences(ctx.step)[1])))
        if eval_now(self.cfg, bool(self.data.valid), *self.epoch_end(ctx.step)):
            out.update(self.valid_margin(ctx))
        if self.checkpoint_due(ctx.step):
            model.save_hf(self.checkpoint_path("actor", ctx.step + 1))
        return None, out

    @torch.no_grad()
    def valid_margin(self, ctx: CallContext) -> dict:
        """Mean S_c − S_r and #{S_c > S_r} over all held-out pairs with this call's model; each dp replica
        takes a contiguous share (figures are right on the last pipeline stage, which holds the heads)."""
        mbs = self.data.valid_micro_batches(ctx)
        parts = self._model(ctx).forward(mbs, post=pair_logp_stats) if mbs else []
        s = sum_stats(parts or [], VALID_KEYS, lambda t: comm.all_reduce(t, ctx.dp))
        n = max(s["num_pairs"], 1.0)
        return {"valid_logp_margin": s["logp_margin_sum"] / n, "valid_accuracy": s["correct_count"] / n}

    def on_results(self, step: int, call: str, by_head: list) -> None:
        stats = [s for _, s in by_head]
        if call == "ref_inf":
            fig = {"ref_time_s": max(s["time_s"] for s in stats)}
            fig.update({k: v for k, v in stats[0].items() if k.startswith("ref_valid_")})
            self.ref_valid_margin = fig.get("ref_valid_logp_margin", self.ref_valid_margin)
            self.record(step, fig)
            return
        tot = stats[0]  # every head reports the same global figures
        n = max(tot["num_pairs"], 1.0)
        fig = {"loss": tot["loss"], "reward_margin": tot["margin_sum"] / n, "accuracy": tot["correct_count"] / n,
               "chosen_reward": tot["chosen_reward_sum"] / n, "rejected_reward": tot["rejected_reward_sum"] / n,
               "logp_margin": tot["logp_margin_sum"] / n, "lr": tot["lr"], "grad_norm": tot["grad_norm"],
               "num_pairs": tot["num_pairs"], "num_tokens": tot["num_tokens"],
               "time_s": max(s["time_s"] for s in stats)}
        fig["tokens_per_s"] = fig["num_tokens"] / max(fig["time_s"], 1e-9)
        fig.update({k: v for k, v in tot.items() if k.startswith("valid_")})
        if "valid_logp_margin" in fig and self.ref_valid_margin is not None:
            fig["valid_reward_margin"] = self.cfg.beta * (fig["valid_logp_margin"] - self.ref_valid_margin)
        self.record(step, fig)


RUNTIME = DPORuntime
