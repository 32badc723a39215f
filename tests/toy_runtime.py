"""A model-free Runtime for executor tests: calls are arithmetic on per-sequence tensors, so every
transfer can be checked exactly, and sleeps make overlap measurable."""

import json
import os
import time

import torch

from executor.data import SeqBatch
from executor.runtime import Runtime
from reallm.cluster import load_cluster
from reallm.dataflow import Call
from reallm.placement import Placement
from reallm.plan import Plan, check
from reallm.spec import ModelSpec

TINY = ModelSpec(family="llama", num_layers=4, hidden_size=16, intermediate_size=32, num_heads=4,
                 num_kv_heads=2, head_dim=4, vocab_size=50)


def toy_plan(placements: dict[str, Placement], n_devices: int, n_seqs: int = 7) -> Plan:
    calls = (Call("a", "ma", "inference", ("x",), ("y",), n_seqs, 8),
             Call("b", "mb", "inference", ("x",), ("z",), n_seqs, 8),
             Call("c", "mc", "inference", ("y", "z"), ("w",), n_seqs, 8))
    return check(Plan(experiment="toy", allocation_mode="manual", config={}, cluster=load_cluster("cpu", 1, n_devices),
                      models={"ma": TINY, "mb": TINY, "mc": TINY}, calls=calls, placements=placements))


class ToyRuntime(Runtime):
    def __init__(self, plan, rank, device, out_dir, steps=2, sleep_s=0.0, fail=None):
        self.plan, self.rank, self.out_dir, self.steps, self.sleep_s, self.fail = plan, rank, out_dir, steps, sleep_s, fail
        self.log = []
        with open(os.path.join(out_dir, f"pid{rank}"), "w") as f:
            f.write(str(os.getpid()))

    def num_steps(self):
        return self.steps

    def step_sequences(self, step):
        n = self.plan.calls[0].n_seqs
        ids = [step * 100 + i for i in range(n)]
        return ids, [1 + (i * 7) % 5 for i in range(n)]  # uneven lengths

    def load(self, ids, keys, ctx):
        ids_l, lens = self.step_sequences(ctx.step)
        ln = dict(zip(ids_l, lens))
        return SeqBatch.from_lists(ids, {"x": [torch.arange(ln[s], dtype=torch.float32) + s for s in ids]})

    def run_call(self, ctx, batch):
        if self.fail == (ctx.step, ctx.call.name, self.rank):
            raise RuntimeError("injected failure")
        if self.fail == "hang":
            time.sleep(3600)
        t0 = time.time()
        time.sleep(self.sleep_s)
        name = ctx.call.name
        if name == "a":
            out = SeqBatch(batch.ids, {"y": batch.data["x"] * 2}, {"y": batch.lens["x"]})
        elif name == "b":
            out = SeqBatch(batch.ids, {"z": batch.data["x"] + 1}, {"z": batch.lens["x"]})
        else:
            out = SeqBatch(batch.ids, {"w": batch.data["y"] + batch.data["z"]}, {"w": batch.lens["y"]})
        self.log.append((ctx.step, name, t0, time.time(), list(batch.ids)))
        return out, {"n": len(batch)}

    def collectable(self, call, out):
        return {"ids": out.ids, "w": out.data["w"].tolist(), "lens": out.lens["w"]} if call == "c" else None

    def on_results(self, step, call, by_head):
        if call == "c":
            with open(os.path.join(self.out_dir, f"c_step{step}.json"), "w") as f:
                json.dump([r[0] for r in by_head], f)

    def finish(self, rank):
        with open(os.path.join(self.out_dir, f"log{rank}.json"), "w") as f:
            json.dump(self.log, f)


def factory(out_dir, **kw):
    return lambda plan, rank, device: ToyRuntime(plan, rank, device, out_dir, **kw)
