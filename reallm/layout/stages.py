"""Pipeline partition: which transformer blocks each pipeline stage owns.

Layers are numbered 0 = embedding, 1+i = block i, L+1 = final norm + head. Stage 0 always owns the
embedding and stage pp-1 the head; the blocks are cut into pp contiguous ranges
``blocks [bounds[s], bounds[s+1])``, each non-empty when pp <= L (when pp > L some stages own no
block and pass activations through).

The cut minimises the largest stage cost (exact, by dynamic programming over cut points), breaking ties
by the smaller sum of squared stage costs. Layer cost c_l depends on ``balance``:

  PARAMS:  c_l = number of parameter elements of layer l, where the last stage also counts the copy of
           the tied embedding it holds as its output head when pp > 1 (memory is what this balances).
  COMPUTE: c_l = forward matmul FLOPs per token = 2 * (elements of the 2-D weights of layer l), with
           the embedding a lookup (0) and the head always a [V, h] matmul, tied or not. Attention-score
           FLOPs grow with sequence length but are the same in every block, so they cannot move the
           cut between blocks; they only shift weight away from embedding/head, which we ignore.

stage cost(s) = sum of c_l over its blocks + c_0 if s == 0 + c_{L+1} if s == pp-1.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from enum import Enum

from reallm.errors import UserError
from reallm.layout.params import param_table
from reallm.spec import ModelSpec


class StageBalance(Enum):
    """What the pipeline partition balances."""

    PARAMS = "params"
    COMPUTE = "compute"


@dataclass(frozen=True)
class StagePartition:
    """Stage s owns blocks ``[bounds[s], bounds[s+1])``; the embedding is on stage 0, the head on the last."""

    num_layers: int
    bounds: tuple[int, ...]

    def __post_init__(self):
        b = tuple(int(x) for x in self.bounds)
        object.__setattr__(self, "bounds", b)
        if len(b) < 2 or b[0] != 0 or b[-1] != self.num_layers or any(x > y for x, y in zip(b, b[1:], strict=False)):
            raise UserError(f"stage bounds {list(b)} must rise from 0 to num_layers={self.num_layers}")
        if len(b) - 1 <= self.num_layers and any(x == y for x, y in zip(b, b[1:], strict=False)):
            raise UserError(f"stage bounds {list(b)}: every stage needs a block when pp <= num_layers")

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    def blocks(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_of_layer(self, layer: int) -> int:
        """Stage owning layer ``layer`` (0 embedding, 1+i block i, L+1 head)."""
        if layer == 0:
            return 0
        if layer == self.num_layers + 1:
            return self.num_stages - 1
        return bisect.bisect_right(self.bounds, layer - 1) - 1


def layer_costs(spec: ModelSpec, pp: int, balance: StageBalance) -> list[int]:
    """Cost c_l of layers 0 .. L+1 (module docstring)."""
    costs = [0] * (spec.num_layers + 2)
    for p in param_table(spec):
        if balance is StageBalance.PARAMS:
            costs[p.layer] += p.numel
        elif len(p.shape) == 2 and p.layer != 0:
            costs[p.layer] += 2 * p.numel
    tied_head = spec.tie_word_embeddings and not spec.is_critic
    if tied_head and (pp > 1 or balance is StageBalance.COMPUTE):
        costs[-1] += (1 if balance is StageBalance.PARAMS else 2) * spec.vocab_size * spec.hidden_size
    return costs


@functools.lru_cache(maxsize=256)
def partition_stages(spec: ModelSpec, pp: int, balance: StageBalance = StageBalance.PARAMS) -> StagePartition:
    """Contiguous blocks per stage minimising (max stage cost, sum of squared stage costs)."""
    L = spec.num_layers
    if pp < 1:
        raise UserError(f"pp must be positive, got {pp}")
    c = layer_costs(spec, pp, balance)
    prefix = [0]
    for x in c[1 : L + 1]:
        prefix.append(prefix[-1] + x)
    min_blocks = 1 if pp <= L else 0

    def stage_cost(s: int, lo: int, hi: int) -> int:
        return prefix[hi] - prefix[lo] + (c[0] if s == 0 else 0) + (c[L + 1] if s == pp - 1 else 0)

    # best[s][j]: (max, sum of squares) of stages 0..s holding blocks [0, j); cut[s][j] its last start.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (L + 1) for _ in range(pp)]
    cut = [[0] * (L + 1) for _ in range(pp)]
    for j in range(L + 1):
        if j >= min_blocks:
            x = stage_cost(0, 0, j)
            best[0][j] = (x, x * x)
    for s in range(1, pp):
        for j in range(L + 1):
            for i in range(j - min_blocks + 1):
                prev = best[s - 1][i]
                if prev == inf:
                    continue
                x = stage_cost(s, i, j)
                cand = (max(prev[0], x), prev[1] + x * x)
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    bounds = [L]
    for s in range(pp - 1, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.append(0)
    return StagePartition(L, tuple(reversed(bounds)))
