"""The ``gen`` experiment: generate answers to a prompt dataset and write ``generated.jsonl``.

Each step takes ``dataset.train_bs_n_seqs`` prompts in file order; every dp replica generates its
contiguous share; rank 0 writes one line per prompt, in input order:
``{"prompt", "output", "output_token_ids"}`` (the new tokens only, EOS included when emitted).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from executor.data import SeqBatch
from executor.runtime import CallContext, Runtime
from reallm.algorithms.base import ModelHandle, has_devices_to_itself, trial_dir_of
from reallm.algorithms.data import epoch_batches, load_tokenizer, tokenize_prompts
from reallm.config.parse import config_from_dict
from reallm.datasets import read_records
from reallm.plan import Plan


class GenRuntime(Runtime):
    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        from reallm.model.generate import GenerationConfig, special_token_ids

        self.plan, self.rank, self.device = plan, rank, device
        self.cfg = cfg = config_from_dict("gen", plan.config)
        self.tok = load_tokenizer(cfg.model.path)
        self.records = read_records(cfg.dataset.path, "prompt", "dataset.path")
        self.samples = tokenize_prompts(self.records, self.tok, cfg.dataset.max_prompt_len)
        self.steps = epoch_batches(len(self.samples), cfg.dataset.train_bs_n_seqs, cfg.seed, 0, shuffle=False)
        self.gen_cfg = GenerationConfig.from_config(cfg.gen)
        self.eos, self.pad = special_token_ids(self.tok)
        self.model = None
        self.lines: dict[int, dict] = {}

    def num_steps(self) -> int:
        return len(self.steps)

    def step_sequences(self, step: int):
        ids = self.steps[step]
        return ids, [len(self.samples[i].tokens) for i in ids]

    def load(self, ids, keys, ctx):
        return SeqBatch.from_lists(ids, {"packed_prompts": [torch.tensor(self.samples[i].tokens) for i in ids]})

    def _model(self, ctx: CallContext) -> ModelHandle:
        if self.model is None:
            self.model = ModelHandle.build(ctx, self.cfg.model, self.cfg.seed, trainable=False)
            if has_devices_to_itself(self.plan, self.rank, ctx.call.name):  # keep caches and captured decode steps
                self.model.pm.keep_decode_graphs()
        return self.model

    @torch.no_grad()
    def run_call(self, ctx: CallContext, batch: SeqBatch):
        keys = ("packed_input_ids", "packed_logprobs", "prompt_mask", "seq_no_eos_mask")
        if not len(batch):  # a short last batch leaves some dp replicas without sequences
            dtypes = (torch.int64, torch.float32, torch.bool, torch.bool)
            return SeqBatch([], {k: torch.empty(0, dtype=d) for k, d in zip(keys, dtypes)},
                            {k: [] for k in keys}), {"num_seqs": 0, "gen_tokens": 0}
        prompts = [batch.seq("packed_prompts", i).tolist() for i in range(len(batch))]
        out = self._model(ctx).pm.generate(prompts, self.gen_cfg, eos_token_id=self.eos, pad_token_id=self.pad,
                                           seed=self.cfg.seed, step=ctx.step, seq_ids=batch.ids)
        if out is None:  # not the last pipeline stage: the dp head holds the results
            return None, {}
        gen = out.sequences()
        packed = out.with_prompts(prompts)
        lens = [len(p) + len(g) for p, g in zip(prompts, gen)]
        result = SeqBatch(batch.ids, {"packed_input_ids": packed["tokens"].cpu(),
                                      "packed_logprobs": packed["logprobs"].float().cpu(),
                                      "prompt_mask": packed["prompt_mask"].cpu(),
                                      "seq_no_eos_mask": packed["no_eos"].to(torch.bool).cpu()},
                          {"packed_input_ids": lens, "packed_logprobs": lens, "prompt_mask": lens,
                           "seq_no_eos_mask": [1] * len(lens)})
        return result, {"num_seqs": len(gen), "gen_tokens": sum(len(g) for g in gen)}

    def collectable(self, call: str, out: SeqBatch):
        plens = [len(self.samples[i].tokens) for i in out.ids]
        return {"ids": out.ids, "new": [out.seq("packed_input_ids", j)[plens[j]:].tolist() for j in range(len(out))]}

    def on_results(self, step: int, call: str, by_head: list) -> None:
        for collected, _stats in by_head:
            for i, new in zip(collected["ids"], collected["new"]):
                self.lines[i] = {"prompt": self.records[i].data["prompt"],
                                 "output": self.tok.decode(new, skip_special_tokens=True),
                                 "output_token_ids": new}
        print(f"gen step {step + 1}/{self.num_steps()}: {len(self.lines)}/{len(self.samples)} prompts done",
              flush=True)

    def finish(self, rank: int) -> None:
        if rank != 0:
            return
        out_dir = trial_dir_of(self.cfg)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "generated.jsonl")
        with open(path + ".tmp", "w") as f:
            for i in sorted(self.lines):
                f.write(json.dumps(self.lines[i]) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {path} ({len(self.lines)} generations)", flush=True)


RUNTIME = GenRuntime
