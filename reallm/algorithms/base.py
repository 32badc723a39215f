"""What every experiment runtime shares: its config, output folder, metrics, and model handles.

A *model handle* is one model role materialised in one placement on this rank. Until tensor and
pipeline parallelism are wired in, a handle holds the whole model (tp = pp = 1) and data parallelism
sums gradients over the dp group (losses are normalised by global counts, so sums are right).
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
from reallm.errors import NotAvailableYet
from reallm.plan import Plan


def trial_dir_of(cfg) -> str:
    return os.path.join(cfg.output_dir, cfg.experiment_name, cfg.trial_name)


def check_single_device_layout(plan: Plan) -> None:
    """Until tensor/pipeline parallelism is wired into the runtimes, a replica must fit one process."""
    for c in plan.calls:
        p = plan.placements[c.name]
        if p.tp > 1 or p.pp > 1:
            raise NotAvailableYet(f"call {c.name}: tensor/pipeline parallelism (tp={p.tp}, pp={p.pp}) is not "
                                  f"available in the runtimes yet; use data parallelism only (e.g. "
                                  f"allocation_mode=d{len(p.devices)}p1m1)")


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
                  device: torch.device) -> "LocalModel":
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

    @classmethod
    def check_plan(cls, plan: Plan) -> None:
        check_single_device_layout(plan)

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
