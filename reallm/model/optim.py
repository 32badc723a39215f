"""AdamW with an LR schedule, global-norm clipping and fp32 master weights for low-precision models.

Learning rate of optimizer update s (0-based) out of S total, peak lr, floor m = min_lr_ratio * lr,
W = floor(warmup_steps_proportion * S) warm-up updates::

    s < W:   lr * (s + 1) / W                                   (linear warm-up, reaching lr at s = W-1)
    s >= W:  p = (s - W) / max(1, S - W)  in [0, 1)
             constant: lr
             linear:   m + (lr - m) * (1 - p)
             cosine:   m + (lr - m) * (1 + cos(pi * p)) / 2

Clipping: g <- g * min(1, max_norm / (||g||_2 + 1e-6)), ||g|| over every gradient of the step (the
caller supplies a reduction when parameters are spread over ranks). A non-finite norm skips the update.

Weight decay (decoupled, AdamW) applies to matrices only; 1-D parameters (norm weights, biases) are not
decayed, the usual choice for LLaMA-family training.

Mixed precision: parameters stored in bf16/fp16 get an fp32 master copy; each backward's low-precision
gradient is added into an fp32 ``.grad`` on the master by a post-accumulate hook (and the low-precision
``.grad`` is dropped), so accumulation over micro-batches happens in fp32. Adam states are fp32. After
the update the master is copied back into the parameter. fp32 parameters (CPU) are their own masters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from reallm.errors import UserError

LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerSettings:
    """The seed's optimizer fields, frozen (``from_config`` takes ``reallm.config.schema.OptimizerConfig``)."""

    lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    min_lr_ratio: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_steps_proportion: float = 0.02
    #: Max global gradient norm; 0 disables clipping.
    gradient_clipping: float = 1.0

    def __post_init__(self):
        problems = []
        if self.lr_scheduler_type not in LR_SCHEDULES:
            problems.append(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {LR_SCHEDULES}")
        if self.lr < 0 or self.weight_decay < 0 or self.eps <= 0 or self.gradient_clipping < 0:
            problems.append("lr, weight_decay, gradient_clipping must be >= 0 and eps > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_steps_proportion <= 1:
            problems.append("min_lr_ratio and warmup_steps_proportion must be in [0, 1]")
        if problems:
            raise UserError("optimizer: " + "; ".join(problems))

    @staticmethod
    def from_config(obj: Any) -> OptimizerSettings:
        sched = obj.lr_scheduler_type
        return OptimizerSettings(
            lr=float(obj.lr), weight_decay=float(obj.weight_decay), beta1=float(obj.beta1), beta2=float(obj.beta2),
            eps=float(obj.eps), min_lr_ratio=float(obj.min_lr_ratio),
            lr_scheduler_type=str(getattr(sched, "value", sched)),
            warmup_steps_proportion=float(obj.warmup_steps_proportion),
            gradient_clipping=float(getattr(obj, "gradient_clipping", 1.0)))


def warmup_steps(settings: OptimizerSettings, total_steps: int) -> int:
    return int(settings.warmup_steps_proportion * total_steps)


def lr_at(step: int, total_steps: int, settings: OptimizerSettings) -> float:
    """Learning rate of update ``step`` (0-based) of ``total_steps`` (module docstring)."""
    W = warmup_steps(settings, total_steps)
    peak, floor = settings.lr, settings.lr * settings.min_lr_ratio
    if step < W:
        return peak * (step + 1) / W
    if settings.lr_scheduler_type == "constant":
        return peak
    p = min(1.0, (step - W) / max(1, total_steps - W))
    if settings.lr_scheduler_type == "linear":
        return floor + (peak - floor) * (1.0 - p)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def global_grad_norm(grads: Iterable[torch.Tensor],
                     norm_sq_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """||g||_2 over ``grads`` (fp32); ``norm_sq_reduce`` sums the squared norm over ranks if given."""
    sq = None
    for g in grads:
        s = g.detach().float().pow(2).sum()
        sq = s if sq is None else sq + s
    if sq is None:
        sq = torch.zeros(())
    if norm_sq_reduce is not None:
        sq = norm_sq_reduce(sq)
    return sq.sqrt()


class MixedPrecisionAdamW:
    """AdamW over named parameters with fp32 masters, schedule and clipping (module docstring).

    ``step()`` returns stats (lr, grad_norm, skipped). ``master_grads()`` exposes the fp32 gradients by
    name, for the executor's reductions (dp all-reduce, tied-embedding sync) before ``step``.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], settings: OptimizerSettings,
                 total_steps: int, *, foreach: Optional[bool] = None):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.settings = settings
        self.total_steps = total_steps
        self.num_updates = 0
        self.params: dict[str, torch.nn.Parameter] = {}
        self.masters: dict[str, torch.Tensor] = {}
        self._hooks = []
        seen: set[int] = set()
        for name, p in named_params:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            self.params[name] = p
            if p.dtype == torch.float32:
                self.masters[name] = p
            else:
                master = p.detach().float().clone().requires_grad_(True)
                self.masters[name] = master
                self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulator(master)))
        decay = [m for n, m in self.masters.items() if m.dim() >= 2]
        no_decay = [m for n, m in self.masters.items() if m.dim() < 2]
        groups = [{"params": decay, "weight_decay": settings.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, total_steps, settings),
                                           betas=(settings.beta1, settings.beta2), eps=settings.eps, foreach=foreach)

    @staticmethod
    def _accumulator(master: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            if master.grad is None:
                master.grad = g
            else:
                master.grad.add_(g)
            p.grad = None

        return hook

    def master_grads(self) -> dict[str, torch.Tensor]:
        """fp32 gradients accumulated so far, by name (absent when a parameter got none)."""
        return {n: m.grad for n, m in self.masters.items() if m.grad is not None}

    def zero_grad(self) -> None:
        for n, m in self.masters.items():
            m.grad = None
            self.params[n].grad = None

    @property
    def lr(self) -> float:
        return lr_at(self.num_updates, self.total_steps, self.settings)

    @torch.no_grad()
    def step(self, norm_sq_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
        """Clip, update with this step's learning rate, copy masters into the parameters."""
        lr = self.lr
        grads = list(self.master_grads().values())
        norm = global_grad_norm(grads, norm_sq_reduce)
        stats = {"lr": lr, "grad_norm": float(norm), "skipped": 0.0}
        if not torch.isfinite(norm):
            stats["skipped"] = 1.0
            self.zero_grad()
            return stats
        clip = self.settings.gradient_clipping
        if clip > 0:
            coef = clip / (float(norm) + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for n, m in self.masters.items():
            p = self.params[n]
            if m is not p:
                p.copy_(m)
        self.num_updates += 1
        return stats

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: Adam states, fp32 masters, the update count."""
        # Deep copy: torch.optim's state_dict shares its tensors, and load_state_dict would alias them.
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "num_updates": self.num_updates,
                "masters": {n: m.detach().clone() for n, m in self.masters.items() if m is not self.params[n]}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.num_updates = int(state["num_updates"])
        for n, t in state["masters"].items():
            self.masters[n].copy_(t)
            self.params[n].copy_(t)
