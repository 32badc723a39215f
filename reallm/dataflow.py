"""Dataflow graphs of model function calls (MFCs).

A node is a ``Call``: a model role running one kind of call (generate / inference / train) over a
batch. Data edges are derived from keys: the producer of a key → each consumer of it; keys nobody
produces come from the dataset. Parameter-version edges make the order of calls on one model
explicit: inside a step every call reading a model's parameters precedes the call that trains them
(kind ``"param"`` edges), and across steps the first call on a model at step i waits for its last
call at step i−1 (``graph.graph["cross_step"]``, kept out of the DAG because they close cycles).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx

from reallm.errors import UserError

CALL_KINDS = ("generate", "inference", "train")


@dataclass(frozen=True)
class Call:
    """One model function call per step."""

    name: str
    role: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    n_seqs: int
    """Sequences per step (the global batch of this call)."""
    max_seqlen: int
    """Upper bound on tokens per sequence (prompt + answer, or prompt + new tokens)."""
    max_new_tokens: int = 0
    """Generate calls: tokens decoded per sequence."""
    n_minibatches: int = 1
    """Train calls: sequential optimizer updates per step (PPO minibatches)."""
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.kind not in CALL_KINDS:
            raise UserError(f"call {self.name}: kind must be one of {CALL_KINDS}, got {self.kind!r}")
        if self.n_seqs < 1:
            raise UserError(f"call {self.name}: batch size must be ≥ 1, got {self.n_seqs}")
        if self.n_minibatches < 1 or self.n_seqs < self.n_minibatches:
            raise UserError(f"call {self.name}: {self.n_minibatches} minibatches need ≥ that many sequences "
                            f"(batch {self.n_seqs})")

    @property
    def is_train(self) -> bool:
        return self.kind == "train"

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "kind": self.kind, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "n_seqs": self.n_seqs, "max_seqlen": self.max_seqlen,
                "max_new_tokens": self.max_new_tokens, "n_minibatches": self.n_minibatches}

    @classmethod
    def from_dict(cls, d: dict) -> Call:
        keys = {"name", "role", "kind", "inputs", "outputs", "n_seqs", "max_seqlen", "max_new_tokens",
                "n_minibatches"}
        unknown = sorted(set(d) - keys - {"placement", "estimate"})
        if unknown:
            raise UserError(f"unknown call field(s) {unknown}")
        missing = sorted({"name", "role", "kind", "inputs", "outputs", "n_seqs", "max_seqlen"} - set(d))
        if missing:
            raise UserError(f"missing call field(s) {missing}")
        return cls(**{k: (tuple(v) if k in ("inputs", "outputs") else v) for k, v in d.items() if k in keys})


def build_graph(calls: Iterable[Call]) -> nx.DiGraph:
    """DAG over call names; node attribute ``call``; edge attributes ``keys`` and ``kind`` (data/param)."""
    calls = list(calls)
    g = nx.DiGraph()
    names = [c.name for c in calls]
    if len(set(names)) != len(names):
        raise UserError(f"duplicate call names in {names}")
    producer: dict[str, str] = {}
    for c in calls:
        g.add_node(c.name, call=c)
        for k in c.outputs:
            if k in producer:
                raise UserError(f"key {k!r} is produced by both {producer[k]} and {c.name}")
            producer[k] = c.name
    for c in calls:
        for k in c.inputs:
            p = producer.get(k)
            if p is None:
                continue  # from the dataset
            if g.has_edge(p, c.name):
                g.edges[p, c.name]["keys"] += (k,)
            else:
                g.add_edge(p, c.name, keys=(k,), kind="data")
    # Parameter versions inside a step: readers of a model precede its train call.
    cross: list[tuple[str, str, str]] = []
    by_role: dict[str, list[Call]] = {}
    for c in calls:
        by_role.setdefault(c.role, []).append(c)
    for role, cs in by_role.items():
        trains = [c for c in cs if c.is_train]
        if len(trains) > 1:
            raise UserError(f"model {role} has several train calls {[c.name for c in trains]}")
        for t in trains:
            for c in cs:
                if c is not t and not g.has_edge(c.name, t.name):
                    g.add_edge(c.name, t.name, keys=(), kind="param")
    if not nx.is_directed_acyclic_graph(g):
        raise UserError(f"the dataflow graph has a cycle: {nx.find_cycle(g)}")
    order = topological_order(g)
    for role in by_role:
        mine = [n for n in order if g.nodes[n]["call"].role == role]
        if any(g.nodes[n]["call"].is_train for n in mine):
            cross.append((mine[-1], mine[0], role))
    g.graph["cross_step"] = cross
    return g


def topological_order(g: nx.DiGraph) -> list[str]:
    """The one global call order every rank uses (ties broken by name): collectives follow it."""
    return list(nx.lexicographical_topological_sort(g))


def dataset_keys(g: nx.DiGraph) -> set[str]:
    produced = {k for n in g.nodes for k in g.nodes[n]["call"].outputs}
    return {k for n in g.nodes for k in g.nodes[n]["call"].inputs if k not in produced}


# -- the experiments' graphs -----------------------------------------------------------------------
PPO_GEN_OUT = ("packed_input_ids", "packed_logprobs", "prompt_mask", "seq_no_eos_mask", "packed_logits_mask")


def ppo_logits_mask_needed(hp) -> bool:
    """Whether PPO generation must hand training a logits mask (``[T, V]`` bool): only when sampling
    removes tokens from the support (top-k, top-p, or the EOS ban of ``min_new_tokens``) and
    ``force_no_logits_mask`` is off. ``hp``: the PPO hyperparameters (``reallm.config.schema``)."""
    if getattr(hp, "force_no_logits_mask", False):
        return False
    filters = not hp.greedy and (int(hp.top_k) > 0 or float(hp.top_p) < 1.0)
    return filters or int(hp.min_new_tokens) > 0


def ppo_calls(n_seqs: int, max_prompt_len: int, max_new_tokens: int, n_minibatches: int,
              reward_model: bool = True, logits_mask: bool = True) -> list[Call]:
    """PPO's six calls; without ``logits_mask`` the mask key is neither produced nor read."""
    seqlen = max_prompt_len + max_new_tokens
    calls = [
        Call("actor_gen", "actor", "generate", ("packed_prompts",), PPO_GEN_OUT, n_seqs, seqlen, max_new_tokens),
        Call("rew_inf", "rew", "inference", ("packed_input_ids",), ("rewards",), n_seqs, seqlen),
        Call("ref_inf", "ref", "inference", ("packed_input_ids", "packed_logits_mask"), ("packed_ref_logprobs",),
             n_seqs, seqlen),
        Call("critic_inf", "critic", "inference", ("packed_input_ids", "seq_no_eos_mask"), ("values",), n_seqs, seqlen),
        Call("actor_train", "actor", "train",
             ("packed_input_ids", "packed_logprobs", "packed_ref_logprobs", "rewards", "values", "prompt_mask",
              "seq_no_eos_mask", "packed_logits_mask"), (), n_seqs, seqlen, n_minibatches=n_minibatches),
        Call("critic_train", "critic", "train",
             ("packed_input_ids", "packed_logprobs", "packed_ref_logprobs", "rewards", "values", "prompt_mask",
              "seq_no_eos_mask"), (), n_seqs, seqlen, n_minibatches=n_minibatches),
    ]
    if not logits_mask:
        calls = [Call(c.name, c.role, c.kind, tuple(k for k in c.inputs if k != "packed_logits_mask"),
                      tuple(k for k in c.outputs if k != "packed_logits_mask"), c.n_seqs, c.max_seqlen,
                      c.max_new_tokens, c.n_minibatches) for c in calls]
    if not reward_model:
        # A rule-based reward is computed by the executor, not by a model: no call of its own.
        calls = [c for c in calls if c.name != "rew_inf"]
        calls = [Call(c.name, c.role, c.kind, c.inputs, c.outputs + (("rewards",) if c.name == "actor_gen" else ()),
                      c.n_seqs, c.max_seqlen, c.max_new_tokens, c.n_minibatches) for c in calls]
    return calls


def dpo_calls(n_seqs: int, max_seqlen: int) -> list[Call]:
    return [
        Call("ref_inf", "ref", "inference", ("packed_input_ids", "prompt_mask", "pair_ids"), ("seqlogp",),
             n_seqs, max_seqlen),
        Call("actor_train", "actor", "train", ("packed_input_ids", "prompt_mask", "pair_ids", "seqlogp"), (),
             n_seqs, max_seqlen),
    ]


def sft_calls(n_seqs: int, max_seqlen: int) -> list[Call]:
    return [Call("train", "default", "train", ("packed_input_ids", "prompt_mask"), (), n_seqs, max_seqlen)]


def rw_calls(n_seqs: int, max_seqlen: int) -> list[Call]:
    return [Call("train", "default", "train", ("packed_input_ids", "pair_ids"), (), n_seqs, max_seqlen)]


def gen_calls(n_seqs: int, max_prompt_len: int, max_new_tokens: int) -> list[Call]:
    return [Call("gen", "default", "generate", ("packed_prompts",),
                 ("packed_input_ids", "packed_logprobs", "prompt_mask", "seq_no_eos_mask"),
                 n_seqs, max_prompt_len + max_new_tokens, max_new_tokens)]


def calls_for(exp: str, cfg) -> list[Call]:
    """The calls of an experiment config (a ``reallm.config.schema`` instance)."""
    d = cfg.dataset
    if exp == "sft":
        return sft_calls(d.train_bs_n_seqs, d.max_seqlen)
    if exp == "rw":
        return rw_calls(d.train_bs_n_seqs * 2 * d.max_pairs_per_prompt, d.max_seqlen)
    if exp == "dpo":
        return dpo_calls(d.train_bs_n_seqs * 2 * d.max_pairs_per_prompt, d.max_seqlen)
    if exp == "ppo":
        p = cfg.ppo
        return ppo_calls(d.train_bs_n_seqs, d.max_prompt_len, p.max_new_tokens, p.ppo_n_minibatches,
                         reward_model=p.reward_fn is None, logits_mask=ppo_logits_mask_needed(p))
    if exp == "gen":
        return gen_calls(d.train_bs_n_seqs, d.max_prompt_len, cfg.gen.max_new_tokens)
    raise UserError(f"unknown experiment {exp!r}")


def roles_of(calls: Iterable[Call]) -> list[str]:
    """Model roles in first-use order."""
    seen: list[str] = []
    for c in calls:
        if c.role not in seen:
            seen.append(c.role)
    return seen


def find_call(calls: Iterable[Call], name: str) -> Optional[Call]:
    return next((c for c in calls if c.name == name), None)
