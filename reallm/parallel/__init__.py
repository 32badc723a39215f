"""Model parallelism for the plain ``reallm.model`` transformer: tensor (+ sequence), pipeline and data
parallelism, applied from outside the model.

Read in this order:

- ``groups``:   where a rank sits in a placement and the process groups it uses (axis-ordered);
- ``tensor``:   tp/SP applied to a plain stage (sharded linears, vocab-parallel embedding/head, hooks);
- ``vocab``:    log-probs and losses on vocabulary shards (``LogitsShard``), no full-vocabulary gather;
- ``pipeline``: schedules as data (1F1B, inference), the deadlock checker, the interpreter;
- ``generate``: generation as a ring of micro-batches around the pipeline stages;
- ``optim``:    AdamW over the flat buffer: fp32 accumulation, bucketed dp sums, ZeRO-1, offload;
- ``model``:    ``ParallelModel``, the one entry point runtimes use.

Importing this package needs torch (unlike ``reallm.layout`` and the planner).
"""

from reallm.parallel.groups import AxisGroup, GroupCache, ParallelGroups, tied_embedding_rank_sets
from reallm.parallel.model import ParallelModel
from reallm.parallel.vocab import LogitsShard, sft_loss, vocab_parallel_target_logprobs

__all__ = ["AxisGroup", "GroupCache", "LogitsShard", "ParallelGroups", "ParallelModel", "sft_loss",
           "tied_embedding_rank_sets", "vocab_parallel_target_logprobs"]
