"""One worker process: build the process groups, then run the plan's schedule step after step.

Started by the local launcher (``executor.launch``) or by torchrun
(``torchrun ... -m executor.worker plan.json``: RANK / WORLD_SIZE / MASTER_ADDR from its environment).
The global rank is the global device id.

What an experiment provides is a ``Runtime`` (see ``executor.runtime``): the dataset's sequences of
each step, the model function calls, and what rank 0 does with the results.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch

from executor import comm
from executor.data import SeqBatch, split_balanced, transfer
from executor.runtime import CallContext, Runtime
from executor.schedule import Op, Schedule, build_schedule
from reallm.dataflow import build_graph
from reallm.plan import Plan

RuntimeFactory = Callable[[Plan, int, torch.device], Runtime]

#: The key whose rows are a sequence's tokens: dp splits are balanced by it.
TOKEN_KEY = "packed_input_ids"


class Worker:
    def __init__(self, plan: Plan, rank: int, runtime: Runtime, device: torch.device):
        self.plan, self.rank, self.rt, self.device = plan, rank, runtime, device
        self.schedule: Schedule = build_schedule(plan)
        self.graph = build_graph(plan.calls)
        self.groups: dict[tuple[int, ...], comm.Group] = {}
        # Per call, token counts of the sequences this head last ran it on (for the splits of its outputs).
        self.seq_tokens: dict[str, dict[int, int]] = {}
        self._make_groups()

    def _make_groups(self) -> None:
        import torch.distributed as dist

        # Every rank creates every group, member or not, in the schedule's one canonical order.
        for ranks in self.schedule.group_rank_sets:
            pg = dist.new_group(list(ranks)) if dist.is_initialized() else None
            self.groups[ranks] = comm.Group(ranks, pg)

    def group(self, ranks) -> comm.Group:
        ranks = tuple(sorted(ranks))
        if len(ranks) == 1:
            return comm.Group(ranks, None)
        return self.groups[ranks]

    def context(self, call_name: str, step: int) -> CallContext:
        p = self.plan.placements[call_name]
        c = p.coord(self.rank)
        replica = tuple(p.device_at(pp, c.dp, t) for pp in range(p.pp) for t in range(p.tp))
        tied = self.group((p.device_at(0, c.dp, c.tp), p.device_at(p.pp - 1, c.dp, c.tp))) if p.pp > 2 else None
        return CallContext(plan=self.plan, call=self.plan.call(call_name), placement=p, rank=self.rank, coord=c,
                           step=step, device=self.device, mesh=self.group(p.devices),
                           tp=self.group(p.tp_group(self.rank)), pp=self.group(p.pp_group(self.rank)),
                           dp=self.group(p.dp_group(self.rank)), replica=self.group(replica), tied=tied)

    # -- the step loop ------------------------------------------------------------------------------
    def run(self) -> None:
        my_ops = self.schedule.ops_for(self.rank)
        for step in range(self.rt.first_step(), self.rt.num_steps()):
            outputs: dict[str, Optional[SeqBatch]] = {}
            inputs: dict[str, SeqBatch] = {}
            results: dict[str, tuple[Optional[SeqBatch], dict]] = {}
            for op in my_ops:
                self._run_op(op, step, outputs, inputs, results)
            self.rt.end_step(step, self.rank)

    def _run_op(self, op: Op, step: int, outputs, inputs, results) -> None:
        if op.kind == "transfer":
            cons = self.plan.placements[op.call]
            replicas = [[cons.device_at(pp, d, t) for pp in range(cons.pp) for t in range(cons.tp)]
                        for d in range(cons.dp)]
            call = self.plan.call(op.call)
            got = transfer(outputs.get(op.producer), op.keys, self.rank, self.group(op.ranks),
                           self.plan.placements[op.producer].dp_heads(), replicas,
                           min_per_replica=cons.num_micro_batches * call.n_minibatches, device=self.device,
                           token_key=TOKEN_KEY, group_size=self.rt.seqs_per_group(op.call),
                           seq_tokens=self.seq_tokens.get(op.producer))
            if got is not None:
                inputs[op.call] = got if op.call not in inputs else inputs[op.call].update(got)
        elif op.kind == "realloc":
            self.rt.realloc(self.context(op.producer, step) if self.rank in self.plan.placements[op.producer].devices
                            else None,
                            self.context(op.call, step) if self.rank in self.plan.placements[op.call].devices else None,
                            self.group(op.ranks), op)
        elif op.kind == "call":
            ctx = self.context(op.call, step)
            batch = self._with_dataset_keys(op.call, step, ctx, inputs.get(op.call))
            on_gpu = self.device.type == "cuda"
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(self.device)
                start_bytes = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            out, stats = self.rt.run_call(ctx, batch)
            if on_gpu:
                torch.cuda.synchronize(self.device)  # the call's time is its device work, not its launches
            stats = dict(stats, time_s=time.perf_counter() - t0, start_s=t0, end_s=time.perf_counter())
            memory = (start_bytes, torch.cuda.max_memory_allocated(self.device)) if on_gpu else None
            if self.rank in ctx.placement.dp_heads():
                outputs[op.call] = out
                results[op.call] = (out, stats, memory)
                if TOKEN_KEY in batch.lens:
                    self.seq_tokens[op.call] = dict(zip(batch.ids, batch.lens[TOKEN_KEY]))
            inputs.pop(op.call, None)
        elif op.kind == "collect":
            heads = self.plan.placements[op.call].dp_heads()
            mine = results.get(op.call) if self.rank in heads else None
            payload = None if mine is None else (self.rt.collectable(op.call, mine[0]), mine[1], mine[2])
            gathered = comm.all_gather_objects(payload, self.group(op.ranks))
            if self.rank == 0:
                by_rank = dict(zip(self.group(op.ranks).ranks, gathered))
                # dp order: contiguous id ranges, input order
                by_head = [None if by_rank[h] is None else by_rank[h][:2] for h in heads]
                self.rt.on_results(step, op.call, by_head)
                memory = [by_rank[h][2] for h in heads if by_rank[h] is not None and by_rank[h][2] is not None]
                if memory:
                    self.rt.on_call_memory(step, op.call, memory_figures(op.call, memory))

    def _with_dataset_keys(self, call_name: str, step: int, ctx: CallContext, batch: Optional[SeqBatch]) -> SeqBatch:
        call = ctx.call
        produced = {k for n in self.graph.nodes for k in self.graph.nodes[n]["call"].outputs}
        ds_keys = [k for k in call.inputs if k not in produced]
        if not ds_keys:
            return batch if batch is not None else SeqBatch([])
        ids, tokens = self.rt.step_sequences(step)
        p = ctx.placement
        split = split_balanced(ids, tokens, p.dp, p.num_micro_batches * call.n_minibatches,
                               self.rt.seqs_per_group(call_name))
        loaded = self.rt.load(split[ctx.coord.dp], ds_keys, ctx)
        return loaded if batch is None else batch.update(loaded)


def memory_figures(call: str, memory: list[tuple[int, int]]) -> dict[str, float]:
    """Per-call device memory in GiB from the dp heads' (allocated at the call's start, peak allocated
    during it): the worst head's. ``torch.cuda.max_memory_allocated`` is reset right before the call, so the
    peak includes whatever was resident then (weights of record, replicas, optimizer state)."""
    gib = float(2**30)
    return {f"mem/peak_gib/{call}": max(p for _, p in memory) / gib,
            f"mem/start_gib/{call}": max(s for s, _ in memory) / gib}


def run_worker(plan: Plan, rank: int, world_size: int, backend: str, init_method: Optional[str],
               runtime_factory: RuntimeFactory) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    comm.init(rank, world_size, backend, init_method)
    try:
        rt = runtime_factory(plan, rank, device)
        Worker(plan, rank, rt, device).run()
        rt.finish(rank)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None, plan: Optional[Plan] = None) -> int:
    """torchrun entry: ``torchrun ... -m executor.worker plan.json``."""
    from executor.runtime import default_runtime_factory, runtime_class
    from reallm.plan import load_plan

    argv = sys.argv[1:] if argv is None else argv
    plan = plan or load_plan(argv[0])
    cls = runtime_class(plan)
    if hasattr(cls, "check_plan"):
        cls.check_plan(plan)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != plan.cluster.num_devices:
        raise SystemExit(f"torchrun started {world} processes but {argv[0]} needs {plan.cluster.num_devices}")
    backend = "nccl" if plan.cluster.device_kind == "gpu" else "gloo"
    run_worker(plan, rank, world, backend, "env://", default_runtime_factory(argv[0]))
    return 0


if __name__ == "__main__":
    from reallm.errors import exit_on_user_error

    sys.exit(exit_on_user_error(main)())
