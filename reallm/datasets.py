"""Reading and checking the experiments' json / jsonl datasets (no torch).

Every experiment reads its files here before any worker starts, so a malformed line, a missing key
or a missing file ends the run at once with the file, the line and the key named.

Formats (no template; the model sees prompt + answer + eos):
- SFT: ``{"prompt": str, "answer": str}``
- RW / DPO: ``{"prompt": str, "pos_answers": [str, ...], "neg_answers": [str, ...]}`` (paired)
- PPO / gen: ``{"prompt": str}``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from reallm.errors import UserError

SCHEMAS: dict[str, dict[str, type]] = {
    "prompt_answer": {"prompt": str, "answer": str},
    "paired": {"prompt": str, "pos_answers": list, "neg_answers": list},
    "prompt": {"prompt": str},
}


@dataclass(frozen=True)
class Record:
    data: dict
    line: int  # 1-based line of the entry's start in its file


def _iter_json_array(text: str, path: str):
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        raise UserError(f"{path}: a .json dataset must be a JSON list of objects (or use .jsonl, one per line)")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{path}: line {text.count(chr(10), 0, pos) + 1}: unterminated JSON list")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
        yield obj, line


def read_records(path: Optional[str], schema: str, field_name: str) -> list[Record]:
    """Read and check every entry of a json/jsonl dataset against ``SCHEMAS[schema]``."""
    if not path:
        raise UserError(f"{field_name} is not set: give the path of a json or jsonl dataset")
    if not os.path.exists(path):
        raise UserError(f"{field_name}={path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        entries = []
        for i, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                entries.append((json.loads(ln), i))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {i}: malformed JSON ({e.msg}, column {e.colno})") from None
    elif path.endswith(".json"):
        entries = list(_iter_json_array(text, path))
    else:
        raise UserError(f"{field_name}={path}: expected a .json or .jsonl file")
    keys = SCHEMAS[schema]
    out = []
    for obj, line in entries:
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {line}: expected a JSON object with keys {sorted(keys)}")
        for k, t in keys.items():
            if k not in obj:
                raise UserError(f"{path}: line {line}: missing key {k!r} (entries need {sorted(keys)})")
            if not isinstance(obj[k], t):
                raise UserError(f"{path}: line {line}: key {k!r} must be a {t.__name__}, got {type(obj[k]).__name__}")
        if schema == "paired":
            _check_pairs(obj, path, line)
        out.append(Record(obj, line))
    if not out:
        raise UserError(f"{path}: the dataset is empty")
    return out


def _check_pairs(obj: dict, path: str, line: int) -> None:
    pos, neg = obj["pos_answers"], obj["neg_answers"]
    if len(pos) != len(neg) or not pos:
        raise UserError(f"{path}: line {line}: pos_answers and neg_answers must be non-empty lists of equal "
                        f"length (they are paired), got {len(pos)} and {len(neg)}")
    for k in ("pos_answers", "neg_answers"):
        if not all(isinstance(a, str) for a in obj[k]):
            raise UserError(f"{path}: line {line}: every entry of {k!r} must be a string")


def check_experiment_datasets(exp: str, cfg: Any) -> dict[str, int]:
    """Read every dataset file an experiment names; returns entries per file. Raises UserError."""
    d = cfg.dataset
    files: list[tuple[Optional[str], str, str, bool]] = []  # path, schema, field, required
    if exp == "sft":
        files = [(d.train_path, "prompt_answer", "dataset.train_path", True),
                 (d.valid_path, "prompt_answer", "dataset.valid_path", False)]
    elif exp in ("rw", "dpo"):
        files = [(d.train_path, "paired", "dataset.train_path", True),
                 (d.valid_path, "paired", "dataset.valid_path", False)]
    elif exp in ("ppo", "gen"):
        files = [(d.path, "prompt", "dataset.path", True), (d.valid_path, "prompt", "dataset.valid_path", False)]
    counts = {}
    for path, schema, field_name, required in files:
        if path is None and not required:
            continue
        counts[path] = len(read_records(path, schema, field_name))
    return counts
