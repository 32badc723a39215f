"""Data moved between calls: bytes of the keys on a data edge, and the transfer time formula.

Key sizes (``KEY_BYTES``) are per token of the sequence (``"token"``), per generated token
(``"gen_token"``, which for the logits mask is a bool per vocabulary entry), or per sequence
(``"seq"``); unknown keys count 4 bytes per token. An edge moves n_seqs · (its keys' sizes).

Transfer of an edge from producer placement a to consumer placement b (``executor.data``: the
producer's dp heads send every consumer rank the sequences it needs, point to point)::

    out per head   = bytes · (r_b − same) / dp_a      r_b = tp_b·pp_b ranks per consumer replica;
                                                       same = 1 when a and b are the same placement
                                                       (the head already holds its share)
    in per rank    = bytes / dp_b
    transfer_time_s = 0 if out = 0, else α + max(out, in) / β
                      β, α: NVLink p2p rates when a's and b's devices are all in one node, else IB.

The simulator evaluates this formula from per-candidate features (``planner.simulate.transfer_time_s``,
and the same lines in ``csrc/planner/anneal``), since a table per pair of candidates would be too big.
"""

from __future__ import annotations

from reallm.dataflow import Call
from reallm.spec import ModelSpec

#: key → (unit, bytes per unit). ``vocab`` as bytes means one byte per vocabulary entry.
KEY_BYTES: dict[str, tuple[str, float | str]] = {
    "packed_input_ids": ("token", 8),
    "packed_prompts": ("token", 8),
    "packed_logprobs": ("token", 4),
    "packed_ref_logprobs": ("token", 4),
    "values": ("token", 4),
    "prompt_mask": ("token", 1),
    "packed_logits_mask": ("gen_token", "vocab"),
    "seq_no_eos_mask": ("seq", 1),
    "rewards": ("seq", 4),
    "seqlogp": ("seq", 4),
    "pair_ids": ("seq", 8),
}


def key_bytes(key: str, call: Call, spec: ModelSpec) -> float:
    """Bytes of ``key`` for one step of ``call``'s batch (``spec`` is the producer's model)."""
    unit, size = KEY_BYTES.get(key, ("token", 4))
    per = float(spec.vocab_size if size == "vocab" else size)
    if unit == "seq":
        return call.n_seqs * per
    tokens = call.max_new_tokens if unit == "gen_token" else call.max_seqlen
    return call.n_seqs * tokens * per


def edge_bytes(keys, producer: Call, spec: ModelSpec) -> float:
    return sum(key_bytes(k, producer, spec) for k in keys)
