"""The ``sft`` experiment: next-token loss on answer tokens of prompt + answer + EOS.

Steps: ``total_train_epochs`` epochs of ``dataset.train_bs_n_seqs`` entries, shuffled per epoch with the
seed. The loss of a step is Σ(answer-token NLL) / (answer tokens of the whole step): every rank knows
the step's sequences, so the denominator needs no communication and the dp gradient sum is the
gradient of the global mean. Valid loss (same normalisation over the valid set) every
``eval_freq_epochs`` epochs; HF checkpoints to ``checkpoints/default/step{N}/``. Recovery state (model
``default``; nothing else: the data position is the step) with them when ``recover_mode`` asks for it.
"""

from __future__ import annotations

from typing import Optional

import torch

from executor import comm
from executor.data import SeqBatch, split_balanced
from executor.runtime import CallContext
from reallm.algorithms.base import ExperimentRuntime, ModelHandle, steps_per_epoch
from reallm.algorithms.data import epoch_batches, load_tokenizer, tokenize_prompt_answer
from reallm.datasets import read_records
from reallm.plan import Plan


def answer_tokens(sample) -> int:
    """Rows counted by the SFT loss: every token after the prompt (its prediction from the row before)."""
    return len(sample.tokens) - sample.prompt_len


def micro_batches(samples, n_mbs: int, denom: float, device) -> list[dict]:
    from reallm.model.transformer import pack_sequences

    ids = list(range(len(samples)))
    out = []
    for part in split_balanced(ids, [len(samples[i].tokens) for i in ids], max(1, min(n_mbs, len(ids)))):
        if not part:
            continue
        seqs = [samples[i].tokens for i in part]
        tokens, cu = pack_sequences([list(s) for s in seqs], device=device)
        pm = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
        for start, i in zip(cu[:-1].tolist(), part):
            pm[start:start + samples[i].prompt_len] = True
        out.append({"tokens": tokens, "cu_seqlens": cu, "prompt_mask": pm,
                    "num_answer_tokens_global": torch.tensor(float(denom))})
    return out


class SFTRuntime(ExperimentRuntime):
    experiment = "sft"
    supports_recovery = True

    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        super().__init__(plan, rank, device, plan_path)
        cfg, d = self.cfg, self.cfg.dataset
        self.tok = load_tokenizer(cfg.model.path)
        self.train = tokenize_prompt_answer(read_records(d.train_path, "prompt_answer", "dataset.train_path"),
                                            self.tok, d.max_seqlen)
        self.valid = (tokenize_prompt_answer(read_records(d.valid_path, "prompt_answer", "dataset.valid_path"),
                                             self.tok, d.max_seqlen) if d.valid_path else [])
        self.per_epoch = steps_per_epoch(len(self.train), d.train_bs_n_seqs)
        self.steps = [b for e in range(cfg.total_train_epochs)
                      for b in epoch_batches(len(self.train), d.train_bs_n_seqs, cfg.seed, e)]
        self.model: Optional[ModelHandle] = None

    def num_steps(self) -> int:
        return len(self.steps)

    def step_sequences(self, step: int):
        ids = self.steps[step]
        return ids, [len(self.train[i].tokens) for i in ids]

    def load(self, ids, keys, ctx):
        return SeqBatch.from_lists(ids, {
            "packed_input_ids": [torch.tensor(self.train[i].tokens) for i in ids],
            "prompt_mask": [torch.arange(len(self.train[i].tokens)) < self.train[i].prompt_len for i in ids]})

    def _model(self, ctx: CallContext) -> ModelHandle:
        return self.trained_model(ctx, self.cfg.model)

    def run_call(self, ctx: CallContext, batch: SeqBatch):
        from reallm.parallel import sft_loss

        model = self._model(ctx)
        denom = sum(answer_tokens(self.train[i]) for i in self.steps[ctx.step])
        samples = [self.train[i] for i in batch.ids]
        mbs = micro_batches(samples, ctx.placement.num_micro_batches, denom, self.device)
        stats = model.train_step(mbs, sft_loss)  # the same on every rank: summed over micro-batches and dp
        out = {"loss": stats.get("loss", 0.0), "lr": stats["lr"], "grad_norm": stats["grad_norm"],
               "num_tokens": float(sum(len(self.train[i].tokens) for i in self.steps[ctx.step]))}
        epoch_end, epoch = self.epoch_end(ctx.step)
        if self.valid and epoch_end and self.cfg.eval_freq_epochs and epoch % self.cfg.eval_freq_epochs == 0:
            out["valid_loss"] = self.valid_loss(ctx)
        if self.checkpoint_due(ctx.step):
            model.save_hf(self.checkpoint_path("default", ctx.step + 1))
        return None, out

    def epoch_end(self, step: int) -> tuple[bool, int]:
        return (step + 1) % self.per_epoch == 0 or step + 1 == self.num_steps(), step // self.per_epoch + 1

    def valid_loss(self, ctx: CallContext) -> float:
        """Mean answer-token NLL over the whole valid set; each dp replica takes a contiguous share."""
        from reallm.parallel import sft_loss

        ids = list(range(len(self.valid)))
        mine = split_balanced(ids, [len(s.tokens) for s in self.valid], ctx.placement.dp)[ctx.coord.dp]
        denom = sum(answer_tokens(s) for s in self.valid)
        total = torch.zeros((), dtype=torch.float64)
        bs = max(1, self.cfg.dataset.valid_bs_n_seqs)
        for i in range(0, len(mine), bs):
            part = [self.valid[j] for j in mine[i:i + bs]]
            losses = self._model(ctx).forward(micro_batches(part, 1, denom, self.device),
                                              post=lambda out, mb: float(sft_loss(out, mb)[0]))
            total += sum(losses) if losses is not None else 0.0  # only the last stage has them
        return float(comm.all_reduce(total, ctx.dp))

    def on_results(self, step: int, call: str, by_head: list) -> None:
        stats = [s for _, s in by_head]  # every head reports the same global figures
        fig = {"loss": stats[0]["loss"], "lr": stats[0]["lr"], "grad_norm": stats[0]["grad_norm"],
               "num_tokens": stats[0]["num_tokens"], "time_s": max(s["time_s"] for s in stats)}
        fig["tokens_per_s"] = fig["num_tokens"] / max(fig["time_s"], 1e-9)
        if "valid_loss" in stats[0]:
            fig["valid_loss"] = stats[0]["valid_loss"]
        self.record(step, fig)


RUNTIME = SFTRuntime
