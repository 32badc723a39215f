"""Paired-comparison data shared by the ``rw`` and ``dpo`` runtimes: ids, the step schedule, packing.

Sequence ids. Entry e (a prompt) yields P_e ≤ ``max_pairs_per_prompt`` (chosen, rejected) pairs, re-sampled
per epoch from the seed when it has more (``data.tokenize_pairs``); pair p of entry e gives the ids::

    id = e · 2·max_pairs + 2p + (0 for the chosen, 1 for the rejected answer)

so ``id // 2`` is a global pair id (the ``pair_ids`` key, one row per sequence), ``id % 2 == 0`` marks the
chosen sequence, and in id order the two sequences of a pair are consecutive. A step's sequences are all
sequences of its batch of ``train_bs_n_seqs`` entries, in id order (the order the executor's transfers
keep, so a call's dataset keys and transferred keys are split alike).

Keeping pairs whole. The pairwise losses need both sequences of a pair in one forward pass, so every
split keeps pairs together: the runtimes' ``seqs_per_group`` is 2, which makes the executor cut its dp
splits only between pairs (``split_balanced(..., group_size=2)``; still contiguous id ranges balanced by
tokens), and micro-batches are cut the same way. Losses are normalised by the step's *global* pair count,
which every rank knows without communication, so dp gradient sums give the gradient of the global mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch

from executor.data import SeqBatch, split_balanced
from reallm.algorithms.base import ExperimentRuntime, steps_per_epoch
from reallm.algorithms.data import Sample, epoch_batches, tokenize_pairs
from reallm.datasets import read_records

#: Sequences per pair: the executor and the micro-batching cut only between whole pairs.
PAIR = 2


def is_chosen(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([i % 2 == 0 for i in ids], dtype=torch.bool)


def pack(ids: Sequence[int], tokens: Sequence[torch.Tensor], prompt_lens: Sequence[int], num_pairs: float,
         device) -> dict:
    """One packed micro-batch of whole pairs: ``tokens`` [T], ``cu_seqlens``, ``prompt_mask`` [T], the
    ``chosen_index`` / ``rejected_index`` [P] into its sequences, and the global pair count ``num_pairs``."""
    from reallm.algorithms.functional import pair_indices

    lens = [int(t.shape[0]) for t in tokens]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    pm = torch.cat([torch.arange(n) < p for n, p in zip(lens, prompt_lens)])
    chosen, rejected = pair_indices(torch.tensor([i // PAIR for i in ids], dtype=torch.int64), is_chosen(ids))
    return {"tokens": torch.cat(list(tokens)).to(device, torch.int64), "cu_seqlens": cu.to(device),
            "prompt_mask": pm.to(device), "chosen_index": chosen.to(device), "rejected_index": rejected.to(device),
            "num_pairs": torch.tensor(float(num_pairs), dtype=torch.float64)}


def batch_micro_batches(batch: SeqBatch, n_mbs: int, num_pairs: float, device) -> list[tuple[list[int], dict]]:
    """The executor's batch (sorted ids, whole pairs) as up to ``n_mbs`` micro-batches of whole pairs,
    balanced by tokens; each with the positions in ``batch`` of its sequences."""
    ids = batch.ids
    whole = len(ids) % PAIR == 0 and all(ids[a] % PAIR == 0 and ids[a + 1] == ids[a] + 1
                                         for a in range(0, len(ids), PAIR))
    if not whole:
        raise ValueError(f"sequences {ids} are not whole (chosen, rejected) pairs in id order: the executor split "
                         f"a pair (is the runtime's seqs_per_group {PAIR}?)")
    if "pair_ids" in batch.lens and batch.data["pair_ids"].tolist() != [i // PAIR for i in ids]:
        raise ValueError("pair_ids do not follow the id convention (pair id = sequence id // 2)")
    lens = batch.lens["packed_input_ids"]
    prompt_lens = [0] * len(ids)
    if "prompt_mask" in batch.lens:  # one host copy, not one per sequence
        pm, off = batch.data["prompt_mask"].cpu(), batch.offsets("prompt_mask")
        prompt_lens = [int(pm[off[i]:off[i + 1]].sum()) for i in range(len(ids))]
    out = []
    for part in split_balanced(range(len(ids)), lens, max(1, min(n_mbs, len(ids) // PAIR)), group_size=PAIR):
        if not part:
            continue
        toks = [batch.seq("packed_input_ids", i) for i in part]
        out.append((part, pack([ids[i] for i in part], toks, [prompt_lens[i] for i in part], num_pairs, device)))
    return out


class PairedData:
    """The train schedule and tokenised pairs (identical on every rank), and the held-out pairs."""

    def __init__(self, cfg, tok):
        d = cfg.dataset
        self.tok, self.seed, self.max_seqlen = tok, cfg.seed, d.max_seqlen
        self.max_pairs = d.max_pairs_per_prompt
        self.stride = PAIR * self.max_pairs
        self.records = read_records(d.train_path, "paired", "dataset.train_path")
        self.per_epoch = steps_per_epoch(len(self.records), d.train_bs_n_seqs)
        self.steps = [(e, b) for e in range(cfg.total_train_epochs)
                      for b in epoch_batches(len(self.records), d.train_bs_n_seqs, cfg.seed, e)]
        # Entries with more pairs than max_pairs are re-sampled every epoch; otherwise tokenise once.
        self.resampled = any(len(r.data["pos_answers"]) > self.max_pairs for r in self.records)
        self._cache: tuple[int, list[list[Sample]]] = (-1, [])
        #: (entry, answer) -> (token ids, prompt length): each string is tokenised once, epochs only resample.
        self._tokens: dict = {}
        self.valid: dict[int, Sample] = {}
        if d.valid_path:
            recs = read_records(d.valid_path, "paired", "dataset.valid_path")
            self.valid = self._by_id(tokenize_pairs(recs, tok, d.max_seqlen, self.max_pairs, cfg.seed, 0))
        self.valid_ids = sorted(self.valid)
        self.valid_bs_seqs = max(1, d.valid_bs_n_seqs) * self.stride

    def _by_id(self, per_entry: list[list[Sample]]) -> dict[int, Sample]:
        return {e * self.stride + j: s for e, seqs in enumerate(per_entry) for j, s in enumerate(seqs)}

    def epoch_samples(self, epoch: int) -> list[list[Sample]]:
        key = epoch if self.resampled else 0
        if self._cache[0] != key:
            self._cache = (key, tokenize_pairs(self.records, self.tok, self.max_seqlen, self.max_pairs,
                                               self.seed, key, self._tokens))
        return self._cache[1]

    def num_steps(self) -> int:
        return len(self.steps)

    def sample(self, step: int, seq_id: int) -> Sample:
        return self.epoch_samples(self.steps[step][0])[seq_id // self.stride][seq_id % self.stride]

    def step_sequences(self, step: int) -> tuple[list[int], list[int]]:
        epoch, entries = self.steps[step]
        samples = self.epoch_samples(epoch)
        ids = sorted(e * self.stride + j for e in entries for j in range(len(samples[e])))
        return ids, [len(self.sample(step, i).tokens) for i in ids]

    def num_pairs(self, step: int) -> int:
        return len(self.step_sequences(step)[0]) // PAIR

    def load(self, step: int, ids: Sequence[int], keys: Sequence[str]) -> SeqBatch:
        samples = [self.sample(step, i) for i in ids]
        make = {"packed_input_ids": lambda i, s: torch.tensor(s.tokens, dtype=torch.int64),
                "prompt_mask": lambda i, s: torch.arange(len(s.tokens)) < s.prompt_len,
                "pair_ids": lambda i, s: torch.tensor([i // PAIR], dtype=torch.int64)}
        return SeqBatch.from_lists(ids, {k: [make[k](i, s) for i, s in zip(ids, samples)] for k in keys})

    def epoch_end(self, step: int) -> tuple[bool, int]:
        """(whether ``step`` ends an epoch, that epoch's 1-based number)."""
        return ((step + 1) % self.per_epoch == 0 or step + 1 == self.num_steps()), step // self.per_epoch + 1

    def valid_micro_batches(self, ctx) -> list[dict]:
        """This dp replica's contiguous share of the held-out pairs, packed at most ``valid_bs_n_seqs`` prompts
        and at most one training micro-batch's worth of sequences at a time (so evaluation never needs more
        activation memory than a training step)."""
        p = ctx.placement
        ids = self.valid_ids
        mine = split_balanced(ids, [len(self.valid[i].tokens) for i in ids], p.dp, group_size=PAIR)[ctx.coord.dp]
        per_mb = max(PAIR, min(self.valid_bs_seqs, ctx.call.n_seqs // (p.dp * p.num_micro_batches)) // PAIR * PAIR)
        out = []
        for a in range(0, len(mine), per_mb):
            part = mine[a:a + per_mb]
            out.append(pack(part, [torch.tensor(self.valid[i].tokens) for i in part],
                            [self.valid[i].prompt_len for i in part], len(ids) // PAIR, ctx.device))
        return out


def eval_now(cfg, has_valid: bool, epoch_end: bool, epoch: int) -> bool:
    return bool(has_valid and epoch_end and cfg.eval_freq_epochs and epoch % cfg.eval_freq_epochs == 0)


def sum_stats(parts: Sequence[dict], keys: Sequence[str],
              all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
    """Sum stat dicts (tensors) over pieces and dp ranks in one all-reduce; a rank without pieces adds zeros."""
    local = torch.tensor([sum(float(p[k]) for p in parts) for k in keys], dtype=torch.float64)
    if all_reduce is not None:
        local = all_reduce(local)
    return dict(zip(keys, local.tolist()))


class PairedRuntime(ExperimentRuntime):
    """What the rw and dpo runtimes share: ``self.data`` (a ``PairedData``) drives the steps, and the
    executor cuts a call's sequences only between (chosen, rejected) pairs."""

    data: PairedData

    def num_steps(self) -> int:
        return self.data.num_steps()

    def step_sequences(self, step: int):
        return self.data.step_sequences(step)

    def seqs_per_group(self, call: str) -> int:
        return PAIR

    def load(self, ids, keys, ctx):
        return self.data.load(ctx.step, ids, keys)

    def epoch_end(self, step: int) -> tuple[bool, int]:
        return self.data.epoch_end(step)
