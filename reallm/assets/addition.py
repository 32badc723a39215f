"""The toy task every tiny asset is built around: two-number addition, with a reward computed by rule.

Prompts look like ``"17+25="`` and answers like ``"42"`` (operands ``0..MAX_OPERAND``, no spaces, no
end-of-sequence marker: the training code appends ``tokenizer.eos_token`` itself).

Dataset files (JSON lines, one object per line; ``sft_train.json`` is the same SFT rows as one JSON list):

* SFT      ``{"prompt": "17+25=", "answer": "42"}``
* RW / DPO ``{"prompt": "17+25=", "pos_answers": ["42", "42"], "neg_answers": ["41", "52"]}`` --
  ``pos_answers[i]`` is paired with ``neg_answers[i]``; negatives are near misses (the sum plus an offset in
  ``NEAR_MISS_OFFSETS``), all different from the sum and from each other, never negative.
* PPO      ``{"prompt": "17+25="}``
* ``rw_full_train``: every train prompt with *all* its near misses (up to ``len(NEAR_MISS_OFFSETS)`` pairs
  per row, the positive repeated), for reward models that must learn addition from the pairs (the
  learning test trains on it: ``rw_train``'s 4000 prompts are too few for that).

Train and valid splits are drawn from disjoint prompt pools, the same pools for every stage, so no valid
prompt is ever seen in any training stage.

This module is stdlib-only on purpose: the reward runs inside PPO workers and the dataset code in tests that
must not pay for (or need) torch.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from typing import Optional

#: Operands are drawn from ``0..MAX_OPERAND`` inclusive: 10,000 distinct prompts, sums ``0..198``.
MAX_OPERAND = 99
#: Prompts held out for the valid split (drawn once; shared by SFT, RW and PPO).
NUM_VALID_PROMPTS = 500
#: Rows in the RW and PPO train files (SFT train uses every train prompt).
NUM_RW_TRAIN = 4000
NUM_PPO_TRAIN = 4000
#: (positive, negative) pairs per RW/DPO prompt.
NUM_PAIRS = 2
#: Wrong answers a model plausibly gives: a units slip, a tens slip (a dropped or doubled carry).
NEAR_MISS_OFFSETS = (-10, -2, -1, 1, 2, 10)

#: File stem → row kind; the names ``make_tiny_assets`` returns as keys as well.
DATASET_FILES = ("sft_train", "sft_valid", "rw_train", "rw_valid", "ppo_train", "ppo_valid", "rw_full_train")

# The last "a+b=" in a prompt: lenient so that a prompt decoded with its "<s>" (or with a few-shot prefix)
# still parses.
_PROMPT_RE = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=")
# A completion's leading integer. Signs are not accepted: sums are never negative, so "-3" is garbage.
_LEADING_INT_RE = re.compile(r"\s*(\d+)")


def make_prompt(a: int, b: int) -> str:
    """The prompt for ``a + b``."""
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    """The two operands of the last ``a+b=`` in ``prompt``; ``ValueError`` when there is none."""
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        raise ValueError(f"not an addition prompt (expected something like '17+25='): {prompt[:80]!r}")
    a, b = matches[-1]
    return int(a), int(b)


def answer_for(prompt: str) -> str:
    """The correct answer to ``prompt``, as the text the model should generate."""
    a, b = parse_prompt(prompt)
    return str(a + b)


def addition_reward(prompt: str, completion: str, *, partial: bool = True) -> float:
    """Rule-based reward in ``[0, 1]`` for a completion of an addition prompt.

    * ``1.0`` when the completion's leading integer (after optional whitespace; leading zeros ignored)
      equals the sum. Anything after it (``"</s>"``, padding, more text) is ignored, so decode either with or
      without special tokens.
    * A wrong integer earns partial credit ``0.5 * matching_digits / max(len(given), len(sum))``, digits
      compared right-aligned (units with units) as the carry structure of addition suggests; always
      ``< 0.5``, so a correct answer always beats any wrong one. ``partial=False`` makes it ``0.0``.
    * No leading integer (garbage, empty, a minus sign) scores ``0.0``.

    ``ValueError`` when ``prompt`` is not an addition prompt: that is a caller bug, not a bad completion.
    """
    target = answer_for(prompt)
    m = _LEADING_INT_RE.match(completion)
    if m is None:
        return 0.0
    # Compare as strings: no int() so a 10,000-digit completion cannot trip Python's int-parsing limit.
    given = m.group(1).lstrip("0") or "0"
    if given == target:
        return 1.0
    if not partial:
        return 0.0
    width = max(len(given), len(target))
    hits = sum(g == t for g, t in zip(given.rjust(width), target.rjust(width), strict=True) if g != " ")
    return 0.5 * hits / width


#: Alias so the reward can be named by the import path ``reallm.assets.addition:reward``.
reward = addition_reward


def near_misses(answer: int, k: int, rng: random.Random) -> list[int]:
    """``k`` distinct wrong answers close to ``answer``, all ``>= 0``, in random order."""
    cands = [answer + d for d in NEAR_MISS_OFFSETS if answer + d >= 0]
    if len(cands) < k:
        raise ValueError(f"only {len(cands)} near misses for {answer}, asked for {k}")
    return rng.sample(cands, k)


def split_prompts(seed: int, num_valid: int = NUM_VALID_PROMPTS) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All operand pairs, shuffled by ``seed`` and cut into (train, valid) pools that share no prompt."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    # String seeds go through SHA-512 in random.seed: the same stream in every process and Python version.
    random.Random(f"addition-split:{seed}").shuffle(pairs)
    return pairs[num_valid:], pairs[:num_valid]


def _sft_rows(pairs: Iterable[tuple[int, int]]) -> list[dict]:
    return [{"prompt": make_prompt(a, b), "answer": str(a + b)} for a, b in pairs]


def _rw_rows(pairs: Iterable[tuple[int, int]], rng: random.Random) -> list[dict]:
    rows = []
    for a, b in pairs:
        s = a + b
        rows.append({"prompt": make_prompt(a, b), "pos_answers": [str(s)] * NUM_PAIRS,
                     "neg_answers": [str(n) for n in near_misses(s, NUM_PAIRS, rng)]})
    return rows


def _rw_full_rows(pairs: Iterable[tuple[int, int]]) -> list[dict]:
    rows = []
    for a, b in pairs:
        s = a + b
        negs = [str(s + d) for d in NEAR_MISS_OFFSETS if s + d >= 0]
        rows.append({"prompt": make_prompt(a, b), "pos_answers": [str(s)] * len(negs), "neg_answers": negs})
    return rows


def _ppo_rows(pairs: Iterable[tuple[int, int]]) -> list[dict]:
    return [{"prompt": make_prompt(a, b)} for a, b in pairs]


def addition_datasets(seed: int = 1) -> dict[str, list[dict]]:
    """Every dataset as rows, keyed by the names in ``DATASET_FILES``. Pure function of ``seed``."""
    train, valid = split_prompts(seed)
    # One named stream per file: changing how one file is drawn never shifts another.
    rw_rng = random.Random(f"addition-rw:{seed}")
    rw_train = random.Random(f"addition-rw-pick:{seed}").sample(train, NUM_RW_TRAIN)
    ppo_train = random.Random(f"addition-ppo-pick:{seed}").sample(train, NUM_PPO_TRAIN)
    return {
        "sft_train": _sft_rows(train),
        "sft_valid": _sft_rows(valid),
        "rw_train": _rw_rows(rw_train, rw_rng),
        "rw_valid": _rw_rows(valid, rw_rng),
        "ppo_train": _ppo_rows(ppo_train),
        "ppo_valid": _ppo_rows(valid),
        "rw_full_train": _rw_full_rows(train),
    }


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line, ``\\n``-terminated, keys in insertion order (byte-stable)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")


def write_datasets(out_dir: str, seed: int = 1, *, json_list_copy: Optional[str] = "sft_train") -> dict[str, str]:
    """Write every dataset as ``<out_dir>/<name>.jsonl``, plus ``<json_list_copy>.json`` as one JSON list.

    Returns name → path; the JSON-list copy is keyed ``<name>_json``.
    """
    os.makedirs(out_dir, exist_ok=True)
    data = addition_datasets(seed)
    paths: dict[str, str] = {}
    for name in DATASET_FILES:
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], data[name])
    if json_list_copy is not None:
        p = os.path.join(out_dir, f"{json_list_copy}.json")
        with open(p, "w", encoding="utf-8", newline="\n") as f:
            # One row per line inside the list: still one JSON document, but diffable and greppable.
            f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in data[json_list_copy]) + "\n]\n")
        paths[f"{json_list_copy}_json"] = p
    return paths
