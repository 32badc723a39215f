"""Tokenised datasets and the step schedule over them, identical on every rank.

Every rank reads and tokenises the (small-to-moderate) dataset itself, so the sequences of a step and
their token counts are known everywhere without communication; the executor then gives each dp rank
its contiguous share balanced by tokens. Global sequence ids are ``entry index * seqs_per_entry + j``
(``seqs_per_entry`` > 1 for paired data: 2·pairs sequences per prompt).

Text is tokenised exactly as ``tokenizer(prompt)`` does (the checkpoint's own special-token rules,
no template); an answer follows as ``tokenizer(answer, add_special_tokens=False)`` plus EOS.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from reallm.datasets import read_records


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class Sample:
    """One sequence: its tokens, how many of them are prompt, and the entry / pair it came from."""

    tokens: tuple[int, ...]
    prompt_len: int
    entry: int
    pair: int = -1  # paired data: index of the (pos, neg) pair inside the entry
    positive: bool = True


def tokenize_prompts(records, tok, max_prompt_len: int) -> list[Sample]:
    out = []
    for i, r in enumerate(records):
        ids = tok(r.data["prompt"])["input_ids"]
        ids = ids[-max_prompt_len:] if len(ids) > max_prompt_len else ids  # keep the end: the question
        out.append(Sample(tuple(ids), len(ids), i))
    return out


def _prompt_answer(tok, prompt: str, answer: str, max_seqlen: int) -> tuple[tuple[int, ...], int]:
    p = tok(prompt)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + a)[:max_seqlen]
    return tuple(ids), min(len(p), len(ids))


def tokenize_prompt_answer(records, tok, max_seqlen: int) -> list[Sample]:
    out = []
    for i, r in enumerate(records):
        ids, plen = _prompt_answer(tok, r.data["prompt"], r.data["answer"], max_seqlen)
        out.append(Sample(ids, plen, i))
    return out


def tokenize_pairs(records, tok, max_seqlen: int, max_pairs: int, seed: int, epoch: int,
                   memo: Optional[dict] = None) -> list[list[Sample]]:
    """Per entry, up to ``max_pairs`` (pos, neg) pairs sampled with (seed, epoch, entry); a list of
    2·pairs samples ordered pos0, neg0, pos1, neg1, ... ``memo`` keeps each (entry, answer)'s tokens
    across calls: later epochs only resample the pairs."""
    memo = {} if memo is None else memo
    out = []
    for i, r in enumerate(records):
        pairs = list(zip(r.data["pos_answers"], r.data["neg_answers"]))
        if len(pairs) > max_pairs:
            pairs = random.Random(hash((seed, epoch, i)) & 0xFFFFFFFF).sample(pairs, max_pairs)
        seqs = []
        for j, (pos, neg) in enumerate(pairs):
            for positive, ans in ((True, pos), (False, neg)):
                key = (i, ans)
                if key not in memo:
                    memo[key] = _prompt_answer(tok, r.data["prompt"], ans, max_seqlen)
                ids, plen = memo[key]
                seqs.append(Sample(ids, plen, i, j, positive))
        out.append(seqs)
    return out


def epoch_batches(num_entries: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = False) -> list[list[int]]:
    """Entry indices of every step of an epoch, shuffled by (seed, epoch)."""
    order = list(range(num_entries))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    bs = max(1, min(batch_size, num_entries))
    out = [order[i:i + bs] for i in range(0, num_entries, bs)]
    if drop_last and len(out) > 1 and len(out[-1]) < bs:
        out.pop()
    return out


def read_dataset(path: Optional[str], schema: str, field_name: str):
    return read_records(path, schema, field_name)


def seq_tokens(samples: Sequence[Sample]) -> list[int]:
    return [len(s.tokens) for s in samples]
