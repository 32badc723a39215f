"""What every experiment runtime shares: its config, output folder, metrics, and model handles.

A *model handle* is one model role materialised in one placement on this rank: its tensor / pipeline
/ data-parallel shard (``reallm.parallel``). Losses are normalised by global counts, so gradients sum
over dp ranks.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from executor import comm
from executor.runtime import CallContext, Runtime
from reallm.config.parse import config_from_dict
from reallm.plan import Plan


def trial_dir_of(cfg) -> str:
    return os.path.join(cfg.output_dir, cfg.experiment_name, cfg.trial_name)


class MetricsWriter:
    """Rank 0: one JSON object per step in ``metrics.jsonl`` and a one-line progress report."""

    def __init__(self, out_dir: str, total_steps: int, resume_from_step: int = 0):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self.t0 = time.time()
        self.first_step = resume_from_step
        self.last_print = 0.0
        if resume_from_step == 0 and os.path.exists(self.path):
            os.remove(self.path)

    def write(self, step: int, figures: dict) -> None:
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in figures.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done = step - self.first_step
        now = time.time()
        # a line per step when steps are slow, else one every couple of seconds
        if step not in (self.first_step + 1, self.total_steps) and now - self.last_print < 2.0:
            return
        self.last_print = now
        elapsed = now - self.t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                         if k in ("loss", "valid_loss", "reward", "tokens_per_s") and isinstance(v, float))
        print(f"step {step}/{self.total_steps} {shown} elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)


class ModelHandle:
    """One model role materialised in one call's placement on this rank (``reallm.parallel.ParallelModel``).

    Every rank of the placement builds it and takes part in every method (they are collectives over the
    placement's groups); outputs exist on the last pipeline stage only (None elsewhere). Parameters are
    views of one flat buffer in the layout algebra's convention, so a reallocated replica is a handle
    built with ``load_weights=False`` whose ``flat()`` the reallocation fills.
    """

    def __init__(self, pm, path: str):
        self.pm, self.path = pm, path

    @classmethod
    def build(cls, ctx: CallContext, model_cfg, seed: int, *, trainable: bool, total_steps: int = 1,
              load_weights: bool = True) -> ModelHandle:
        from reallm.model.optim import OptimizerSettings
        from reallm.parallel import ParallelGroups, ParallelModel

        opt_cfg = model_cfg.optimizer
        optimizer = OptimizerSettings.from_config(opt_cfg) if trainable and opt_cfg.type.value != "empty" else None
        dtype = torch.bfloat16 if (model_cfg.bf16 and ctx.device.type == "cuda") else torch.float32
        pm = ParallelModel.build(model_cfg.path, ParallelGroups.from_context(ctx), is_critic=model_cfg.type.is_critic,
                                 dtype=dtype, device=ctx.device, optimizer=optimizer, total_steps=total_steps,
                                 zero1=opt_cfg.zero_stage == 1, offload_optimizer=opt_cfg.offload,
                                 gradient_checkpointing=model_cfg.gradient_checkpointing and optimizer is not None,
                                 critic_init_seed=seed, load_weights=load_weights)
        return cls(pm, model_cfg.path)

    @property
    def is_last_stage(self) -> bool:
        return self.pm.is_last_stage

    def flat(self) -> torch.Tensor:
        return self.pm.flat_parameters()

    def forward(self, micro_batches: Sequence[dict], post: Optional[Callable] = None) -> Optional[list]:
        return self.pm.forward(micro_batches, post)

    def train_step(self, micro_batches: Sequence[dict], loss_fn: Callable) -> dict:
        """Same stats on every rank: loss-fn stats summed over micro-batches and dp, lr, grad_norm."""
        return self.pm.train_step(micro_batches, loss_fn)

    def save_hf(self, out_dir: str) -> None:
        """Collective over the placement; one rank writes."""
        self.pm.save_hf(out_dir)


# Transitional: the whole-model handle (tp = pp = 1) the rw/dpo runtimes are still being written against.
class LocalModel:
    """A whole model on this rank (tp = pp = 1), trained with dp gradient sums over ``ctx.dp``.

    Built from an HF checkpoint, or (``from_flat``) from a flat buffer in the layout algebra's
    convention, which is how a reallocated replica arrives.
    """

    def __init__(self, path: str, is_critic: bool, device: torch.device, seed: int,
                 optimizer_cfg=None, total_steps: int = 1, gradient_checkpointing: bool = False,
                 model=None):
        from reallm.model.hf_io import load_hf_model

        self.path = path
        self.model = model if model is not None else load_hf_model(path, is_critic=is_critic, device=device,
                                                                    critic_init_seed=seed)
        self.model.gradient_checkpointing = gradient_checkpointing
        self.optimizer = None
        if optimizer_cfg is not None and optimizer_cfg.type.value != "empty":
            from reallm.model.optim import MixedPrecisionAdamW, OptimizerSettings

            self.optimizer = MixedPrecisionAdamW(self.model.hf_named_parameters(),
                                                 OptimizerSettings.from_config(optimizer_cfg), total_steps)

    # -- reallocation in the layout algebra's flat-buffer convention --------------------------------
    def flat_params(self, placement, device_id: int) -> torch.Tensor:
        from reallm.layout import shards_of

        params = dict(self.model.hf_named_parameters())
        shards = shards_of(self.model.spec, placement, device_id).shards
        return torch.cat([params[sh.name].detach().reshape(-1) for sh in shards])

    @staticmethod
    def from_flat(path: str, is_critic: bool, flat: torch.Tensor, placement, device_id: int,
                  device: torch.device) -> LocalModel:
        from reallm.layout import shards_of
        from reallm.model.hf_io import read_hf_model
        from reallm.model.transformer import Transformer

        info = read_hf_model(path, is_critic)
        model = Transformer.empty(info.spec, arch=info.arch, device=device)
        params = dict(model.hf_named_parameters())
        with torch.no_grad():
            for sh in shards_of(info.spec, placement, device_id).shards:
                params[sh.name].copy_(flat[sh.offset:sh.offset + sh.num_elements].view(sh.local_shape))
        return LocalModel(path, is_critic, device, 0, model=model)

    # -- calls ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, micro_batches: Sequence[dict]) -> list[torch.Tensor]:
        self.model.eval()
        return [self.model(mb["tokens"], mb["cu_seqlens"]) for mb in micro_batches]

    def backward(self, micro_batches: Sequence[dict], loss_fn: Callable) -> list:
        """Forward and backward every micro-batch (gradients accumulate); returns the loss_fn stats."""
        self.model.train()
        out = []
        for mb in micro_batches:
            loss, stats = loss_fn(self.model(mb["tokens"], mb["cu_seqlens"]), mb)
            loss.backward()
            out.append(stats)
        return out

    def sync_grads(self, ctx: CallContext) -> None:
        """Sum the fp32 gradients over the dp ranks (a rank without data contributes zeros)."""
        if ctx.dp.size == 1:
            return
        masters = self.optimizer.masters
        names = sorted(masters)
        flat = torch.cat([(masters[n].grad if masters[n].grad is not None else torch.zeros_like(masters[n]))
                          .reshape(-1) for n in names])
        comm.all_reduce(flat, ctx.dp)
        off = 0
        for n in names:
            m = masters[n]
            m.grad = flat[off:off + m.numel()].view_as(m).clone()
            off += m.numel()

    def train_step(self, ctx: CallContext, micro_batches: Sequence[dict], loss_fn: Callable) -> dict:
        from reallm.model.train import forward_backward

        self.model.train()
        self.optimizer.zero_grad()
        stats = forward_backward(self.model, micro_batches, loss_fn)
        self.sync_grads(ctx)
        stats.update(self.optimizer.step())
        return stats

    def save_hf(self, out_dir: str) -> None:
        from reallm.model.hf_io import save_hf_model

        save_hf_model(self.model, out_dir, source_path=self.path)


class ExperimentRuntime(Runtime):
    """Config, output folder and metrics for the experiments' runtimes."""

    experiment = ""

    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        self.plan, self.rank, self.device = plan, rank, device
        self.cfg = config_from_dict(self.experiment, plan.config)
        self.out_dir = trial_dir_of(self.cfg)
        torch.manual_seed(self.cfg.seed)
        self.metrics: Optional[MetricsWriter] = None
        self.pending: dict[int, dict] = {}

    def record(self, step: int, figures: dict) -> None:
        """Rank 0: add figures for ``step`` (1-based in metrics); written at the end of the step."""
        self.pending.setdefault(step, {}).update(figures)

    def end_step(self, step: int, rank: int) -> None:
        if rank != 0:
            return
        if self.metrics is None:
            self.metrics = MetricsWriter(self.out_dir, self.num_steps())
        self.metrics.write(step + 1, self.pending.pop(step, {}))


def steps_per_epoch(num_entries: int, batch_size: int) -> int:
    return max(1, math.ceil(num_entries / max(1, batch_size)))
