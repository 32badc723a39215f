"""Packed per-sequence data and its movement between calls.

A ``SeqBatch`` holds sequences by global id; every key is one tensor packed along dim 0 with the rows
of each sequence contiguous (tokens of ``packed_input_ids``, one row of ``rewards``, ...), and
``lens[key][i]`` rows belong to ``ids[i]``. Sequences are kept sorted by id, so gathering pieces from
several producers restores the input order.

Transfer of one data edge (all ranks of ``op.ranks``, in the global op order):
1. the producer's dp heads all-gather the metadata of what they hold (ids, rows per key, dtypes);
2. every member computes the consumer's split (contiguous id ranges balanced by tokens) the same way;
3. each head sends each consumer rank the sequences it needs, one tensor per key, point to point.
Nothing goes through a driver process or a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from executor import comm


@dataclass
class SeqBatch:
    ids: list[int]
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    lens: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        for k, t in self.data.items():
            if sum(self.lens[k]) != t.shape[0] or len(self.lens[k]) != len(self.ids):
                raise ValueError(f"key {k}: {len(self.lens[k])} lengths summing to {sum(self.lens[k])} "
                                 f"for {len(self.ids)} sequences and {t.shape[0]} rows")

    def __len__(self) -> int:
        return len(self.ids)

    def keys(self):
        return self.data.keys()

    def offsets(self, key: str) -> list[int]:
        out, acc = [0], 0
        for n in self.lens[key]:
            acc += n
            out.append(acc)
        return out

    def seq(self, key: str, i: int) -> torch.Tensor:
        """Rows of the i-th sequence (by position, not id)."""
        off = self.offsets(key)
        return self.data[key][off[i]:off[i + 1]]

    def select(self, ids: Sequence[int], keys: Optional[Sequence[str]] = None) -> SeqBatch:
        pos = {s: i for i, s in enumerate(self.ids)}
        idx = [pos[s] for s in ids]
        keys = list(self.data) if keys is None else list(keys)
        data, lens = {}, {}
        for k in keys:
            off = self.offsets(k)
            parts = [self.data[k][off[i]:off[i + 1]] for i in idx]
            data[k] = torch.cat(parts) if parts else self.data[k][:0]
            lens[k] = [self.lens[k][i] for i in idx]
        return SeqBatch(list(ids), data, lens)

    def update(self, other: SeqBatch) -> SeqBatch:
        """Add ``other``'s keys (same ids, any order)."""
        if sorted(other.ids) != sorted(self.ids):
            raise ValueError("update needs the same sequences")
        o = other.select(self.ids) if other.ids != self.ids else other
        self.data.update(o.data)
        self.lens.update(o.lens)
        return self

    @staticmethod
    def from_lists(ids: Sequence[int], values: dict[str, Sequence[torch.Tensor]]) -> SeqBatch:
        data = {k: torch.cat(list(v)) if len(v) else torch.empty(0) for k, v in values.items()}
        return SeqBatch(list(ids), data, {k: [t.shape[0] for t in v] for k, v in values.items()})

    @staticmethod
    def concat(batches: Sequence[SeqBatch]) -> SeqBatch:
        """Union of disjoint batches with the same keys, sorted by id."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return SeqBatch([])
        keys = list(batches[0].data)
        entries = []
        for b in batches:
            offs = {k: b.offsets(k) for k in keys}
            for i, s in enumerate(b.ids):
                entries.append((s, {k: b.data[k][offs[k][i]:offs[k][i + 1]] for k in keys}))
        entries.sort(key=lambda e: e[0])
        return SeqBatch.from_lists([e[0] for e in entries], {k: [e[1][k] for e in entries] for k in keys})


def split_balanced(ids: Sequence[int], tokens: Sequence[int], parts: int, min_per_part: int = 1,
                   group_size: int = 1) -> list[list[int]]:
    """Contiguous id ranges, one per part, with token sums as even as a greedy cut allows, each with at
    least ``min_per_part`` sequences (and at least one whenever there are enough sequences).

    ``group_size`` k > 1: cuts fall only between groups of k consecutive ids (positions 0..k−1, k..2k−1, …),
    so a group (k = 2: a chosen/rejected pair) never straddles two parts; ``min_per_part`` still counts
    sequences (rounded up to whole groups)."""
    if group_size > 1:
        k = group_size
        if len(ids) % k:
            raise ValueError(f"split_balanced: {len(ids)} sequences are not whole groups of {k}")
        group_tokens = [sum(tokens[i:i + k]) for i in range(0, len(ids), k)]
        by_group = split_balanced(range(len(group_tokens)), group_tokens, parts, -(-min_per_part // k))
        return [[ids[g * k + j] for g in part for j in range(k)] for part in by_group]
    n = len(ids)
    need = min(min_per_part, n // parts) if parts else 0
    total = float(sum(tokens))
    out, start, acc = [], 0, 0.0
    for p in range(parts):
        remaining_parts = parts - p - 1
        if remaining_parts == 0:
            end = n
        else:
            target = total * (p + 1) / parts
            end = start
            # take at least `need`, leave at least `need` for each remaining part
            while end < n - need * remaining_parts and (end - start < need or acc + tokens[end] / 2 <= target):
                acc += tokens[end]
                end += 1
        out.append(list(ids[start:end]))
        start = end
    return out


def _meta(b: Optional[SeqBatch], keys: Sequence[str], token_key: Optional[str] = None,
          seq_tokens: Optional[Mapping[int, int]] = None):
    if b is None:
        return None
    # Token counts of the sequences, even when the token key itself is not moved (e.g. one ``seqlogp`` row
    # per sequence): the consumer's split must equal the one its other inputs (dataset keys, other edges)
    # get, and those are balanced by tokens.
    tokens = None
    if token_key is not None and token_key in b.lens:
        tokens = list(b.lens[token_key])
    elif seq_tokens is not None and all(s in seq_tokens for s in b.ids):
        tokens = [seq_tokens[s] for s in b.ids]
    return {"ids": list(b.ids), "lens": {k: b.lens[k] for k in keys}, "tokens": tokens,
            "dtype": {k: str(b.data[k].dtype).replace("torch.", "") for k in keys},
            "shape": {k: tuple(b.data[k].shape[1:]) for k in keys}}


def transfer(batch: Optional[SeqBatch], keys: Sequence[str], rank: int, group: comm.Group,
             heads: Sequence[int], consumer_replicas: Sequence[Sequence[int]], min_per_replica: int,
             device: torch.device, token_key: Optional[str] = None, group_size: int = 1,
             seq_tokens: Optional[Mapping[int, int]] = None) -> Optional[SeqBatch]:
    """Move ``keys`` from the producer heads (each holding ``batch``) to every consumer rank.

    ``consumer_replicas[j]`` lists the ranks of the consumer's dp replica j (each receives replica j's
    sequences). Returns this rank's ``SeqBatch`` if it is a consumer, else None. The split is balanced by
    the sequences' ``token_key`` lengths (from ``batch``, else from ``seq_tokens``, the token counts a
    head knows for the sequences it produced; else by the rows of the first key) and cut only between
    groups of ``group_size`` consecutive ids.
    """
    keys = sorted(keys)
    metas = comm.all_gather_objects(_meta(batch if rank in heads else None, keys, token_key, seq_tokens), group)
    by_rank = {r: m for r, m in zip(group.ranks, metas) if r in heads}
    holder, rows = {}, {}
    for h in heads:
        m = by_rank[h]
        for i, s in enumerate(m["ids"]):
            holder[s] = (h, i)
            rows[s] = m["tokens"][i] if m["tokens"] is not None else m["lens"][keys[0]][i]
    all_ids = sorted(holder)
    splits = split_balanced(all_ids, [rows[s] for s in all_ids], len(consumer_replicas), min_per_replica,
                            group_size)

    sends, recvs, received = [], [], {}
    mine: Optional[list[int]] = None
    for j, replica in enumerate(consumer_replicas):
        want = splits[j]
        for c in sorted(replica):
            if c == rank:
                mine = want
            for h in heads:
                sub = [s for s in want if holder[s][0] == h]
                if not sub or h == c:
                    continue
                m = by_rank[h]
                for k in keys:
                    n_rows = sum(m["lens"][k][holder[s][1]] for s in sub)
                    if rank == h:
                        sends.append((batch.select(sub, [k]).data[k].contiguous(), c))
                    elif rank == c:
                        t = torch.empty((n_rows, *m["shape"][k]), dtype=getattr(torch, m["dtype"][k]), device=device)
                        recvs.append((t, h))
                        received[(h, k)] = (sub, [m["lens"][k][holder[s][1]] for s in sub], t)
    comm.exchange(sends, recvs)
    if mine is None:
        return None
    pieces = []
    for h in heads:
        sub = [s for s in mine if holder[s][0] == h]
        if not sub:
            continue
        if h == rank:
            pieces.append(batch.select(sub, keys))
        else:
            pieces.append(SeqBatch(sub, {k: received[(h, k)][2] for k in keys},
                                   {k: received[(h, k)][1] for k in keys}))
    out = SeqBatch.concat(pieces)
    if not len(out):
        out = SeqBatch([], {k: torch.empty((0, *by_rank[heads[0]]["shape"][k]),
                                           dtype=getattr(torch, by_rank[heads[0]]["dtype"][k])) for k in keys},
                       {k: [] for k in keys})
    return out
