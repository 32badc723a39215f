"""What every experiment runtime shares: its config, output folder, metrics, model handles, checkpoints
and recovery.

A *model handle* is one model role materialised in one placement on this rank: its tensor / pipeline
/ data-parallel shard (``reallm.parallel``). Losses are normalised by global counts, so gradients sum
over dp ranks.

Checkpoints and recovery (formats in ``reallm.algorithms.recovery``): a runtime saves HF exports with
``ModelHandle.save_hf(self.checkpoint_path(role, step + 1))`` when ``checkpoint_due(step)``; it hands
every trained handle (weights of record) to ``track(key, handle)``; a subclass with state outside its
models (PPO: value normaliser, adaptive KL) overrides ``runtime_state`` / ``load_runtime_state``. The
base class does the rest: on the same steps it writes every rank's recovery state at the end of the
step (``end_step``), and when resuming it starts at ``first_step()`` with the RNGs and runtime state
restored, and loads each tracked handle's state when the handle is built.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Optional, TextIO

import torch

from executor import comm
from executor.runtime import CallContext, Runtime
from reallm.algorithms import recovery
from reallm.config.parse import config_from_dict
from reallm.errors import NotAvailableYet, UserError
from reallm.plan import Plan


def trial_dir_of(cfg) -> str:
    return os.path.join(cfg.output_dir, cfg.experiment_name, cfg.trial_name)


#: ``REALLM_QUIET=1`` hides rank 0's progress report. ``quickstart.run(quiet=True)`` sets it around its
#: launch (``progress_display``): an environment variable reaches forked and spawned workers alike.
QUIET_ENV = "REALLM_QUIET"


@contextlib.contextmanager
def progress_display(enabled: bool) -> Iterator[None]:
    """Show (or not) the progress report of the runs launched inside the block from this process."""
    saved = os.environ.get(QUIET_ENV)
    os.environ[QUIET_ENV] = "0" if enabled else "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(QUIET_ENV, None)
        else:
            os.environ[QUIET_ENV] = saved


def progress_shown() -> bool:
    return os.environ.get(QUIET_ENV, "0") != "1"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class StepProgress:
    """Rank 0's report of the step loop: step / total, the loss (or PPO's reward; SFT's valid loss when
    evaluated), tokens/s and ETA.

    On a terminal (``stream`` a TTY, stderr by default): a tqdm bar redrawn at most every
    ``BAR_INTERVAL_S``. Otherwise (logs, CI): lines on stdout, one per step when steps are slow, else one
    every ``LINE_INTERVAL_S``, always the first and last step's, so logs stay readable.

    tokens/s is the last step's ``num_tokens`` over its wall time (the first step's includes building the
    models). ETA = remaining steps × the mean wall time of the steps after the first (``?`` until there is
    one).
    """

    BAR_INTERVAL_S = 0.5
    LINE_INTERVAL_S = 2.0
    SHOWN = ("loss", "valid_loss", "reward")

    def __init__(self, total_steps: int, first_step: int = 0, *, start_s: Optional[float] = None,
                 stream: Optional[TextIO] = None, enabled: bool = True):
        self.total_steps, self.first_step = total_steps, first_step
        self.start_s = time.time() if start_s is None else start_s
        self.last_step_end_s = self.start_s
        self.first_step_end_s: Optional[float] = None
        self.last_line_s = 0.0
        self.enabled = enabled
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if enabled and _is_terminal(stream):
            from tqdm import tqdm

            sized = _terminal_width(stream) > 0  # a terminal of unknown size: tqdm would draw nothing
            self.bar = tqdm(total=total_steps, initial=first_step, file=stream, mininterval=self.BAR_INTERVAL_S,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                            desc="step", unit="step",
                            bar_format="{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
            self.bar.start_t = self.start_s  # its elapsed time counts from the run's start, like the ETA

    def update(self, step: int, figures: dict, now_s: Optional[float] = None) -> None:
        """``step`` (1-based) is done with these figures."""
        now_s = time.time() if now_s is None else now_s
        step_s = max(now_s - self.last_step_end_s, 1e-9)
        self.last_step_end_s = now_s
        if self.first_step_end_s is None:
            self.first_step_end_s = now_s
        if not self.enabled:
            return
        done, left = step - self.first_step, self.total_steps - step
        # the first step also built the models: no ETA from it alone
        eta_s = 0.0 if not left else (now_s - self.first_step_end_s) / (done - 1) * left if done > 1 else None
        shown = {k: figures[k] for k in self.SHOWN if isinstance(figures.get(k), (int, float))}
        if isinstance(figures.get("num_tokens"), (int, float)):
            shown["tokens_per_s"] = figures["num_tokens"] / step_s
        if self.bar is not None:
            text = " ".join(f"{k.replace('tokens_per_s', 'tok/s')}={v:.4g}" for k, v in shown.items())
            eta = "?" if eta_s is None else self.bar.format_interval(eta_s)
            self.bar.set_postfix_str(f"{text} eta {eta}", refresh=False)
            self.bar.update(step - self.bar.n)
            if step == self.total_steps:
                self.close()
            return
        if step not in (self.first_step + 1, self.total_steps) and now_s - self.last_line_s < self.LINE_INTERVAL_S:
            return
        self.last_line_s = now_s
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        eta = "?" if eta_s is None else f"{eta_s:.0f}s"
        print(f"step {step}/{self.total_steps} {text} elapsed {now_s - self.start_s:.0f}s eta {eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsWriter:
    """Rank 0: one JSON object per step in ``metrics.jsonl``, the same scalars as TensorBoard events under
    ``tensorboard/`` (``tensorboard --logdir {trial}``), and the progress report (``StepProgress``)."""

    def __init__(self, out_dir: str, total_steps: int, resume_from_step: int = 0, start_s: Optional[float] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.total_steps = total_steps
        if resume_from_step == 0 and os.path.exists(self.path):
            os.remove(self.path)
        self.tb_dir = os.path.join(out_dir, "tensorboard")
        self._tb = None
        self.progress = StepProgress(total_steps, resume_from_step, start_s=start_s, enabled=progress_shown())

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time; metrics.jsonl is the record
                self._tb = False
            else:
                self._tb = SummaryWriter(self.tb_dir, flush_secs=10)
        return self._tb or None

    def close(self) -> None:
        self.progress.close()
        if self._tb:
            self._tb.close()

    def write(self, step: int, figures: dict) -> None:
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in figures.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, float):
                    tb.add_scalar(k, v, step)
            if step == self.total_steps:
                tb.flush()
        self.progress.update(step, rec)


def has_devices_to_itself(plan, rank: int, call_name: str) -> bool:
    """Does call ``call_name`` alone use ``rank``'s devices in ``plan``? Then what it keeps on them between
    steps (train graphs, a generation's KV caches and captured decode steps) stands in nobody's way."""
    return not any(c.name != call_name and rank in plan.placements[c.name].devices for c in plan.calls)


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
              load_weights: bool = True, inference_graphs: bool = False, train_resident: bool = False) -> ModelHandle:
        """``inference_graphs``: a frozen model that stays on its devices between calls replays its inference
        forward from CUDA graphs (``ParallelModel.use_inference_graphs``, where usable); not for a replica
        that lives for one call, nor a model offloaded between calls (each call would capture anew).
        ``train_resident``: a trained model whose train call has its devices to itself
        (``keeps_train_resident``); it replays its train micro-batches from CUDA graphs where the config's
        ``train_cuda_graphs`` asks and ``train_graphs_usable`` allows."""
        from reallm.model.optim import OptimizerSettings

        opt_cfg = model_cfg.optimizer
        optimizer = OptimizerSettings.from_config(opt_cfg) if trainable and opt_cfg.type.value != "empty" else None
        dtype = torch.bfloat16 if (model_cfg.bf16 and ctx.device.type == "cuda") else torch.float32
        # Building never draws from the global generators: a resumed run builds its models at another step.
        with torch.random.fork_rng(devices=[ctx.device.index] if ctx.device.type == "cuda" else []):
            pm = cls._build_pm(ctx, model_cfg, seed, optimizer, dtype, total_steps, load_weights,
                               inference_graphs and optimizer is None)
        if optimizer is not None and train_resident and getattr(model_cfg, "train_cuda_graphs", True):
            from reallm.parallel.model import train_graphs_usable

            if train_graphs_usable(pm):
                pm.use_train_graphs()
        return cls(pm, model_cfg.path)

    @staticmethod
    def _build_pm(ctx: CallContext, model_cfg, seed: int, optimizer, dtype, total_steps: int, load_weights: bool,
                  inference_graphs: bool):
        from reallm.parallel import ParallelGroups, ParallelModel

        opt_cfg = model_cfg.optimizer
        return ParallelModel.build(model_cfg.path, ParallelGroups.from_context(ctx),
                                   is_critic=model_cfg.type.is_critic, dtype=dtype, device=ctx.device,
                                   optimizer=optimizer, total_steps=total_steps, zero1=opt_cfg.zero_stage == 1,
                                   offload_optimizer=opt_cfg.offload,
                                   gradient_checkpointing=model_cfg.gradient_checkpointing and optimizer is not None,
                                   critic_init_seed=seed, load_weights=load_weights,
                                   compile_blocks=getattr(model_cfg, "compile", False),
                                   inference_graphs=inference_graphs)

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
        """Collective over the placement; one rank writes the checkpoint under a temporary name and renames it
        to ``out_dir`` when whole (a crash never leaves a half checkpoint there). Readable on return."""
        pm = self.pm
        writer = pm.placement.device_at(0, 0, 0)
        tmp = recovery.temp_path(out_dir)
        if pm.groups.rank == writer:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        pm.save_hf(tmp, writer=writer)
        if pm.groups.rank == writer:
            recovery.publish_dir(tmp, out_dir)
        comm.barrier(pm.groups.mesh)

    # -- recovery ------------------------------------------------------------------------------------
    def training_state(self) -> dict:
        """This rank's part of everything training continues from: the flat parameter buffer and the optimizer
        (fp32 masters when separate, Adam moments, update count = LR schedule position). Host copies."""
        pm = self.pm
        params_away, state_away = pm.params_offloaded, pm.offloaded and not pm.params_offloaded
        pm.reload()
        try:
            return {"num_elements": pm.shards.num_elements, "flat": pm.flat_parameters().detach().cpu().clone(),
                    "optimizer": pm.optimizer.state_dict() if pm.optimizer is not None else None}
        finally:
            if params_away or state_away:
                pm.offload(state_only=state_away)

    @torch.no_grad()
    def load_training_state(self, state: dict) -> None:
        """Restore what ``training_state`` returned (on a handle built for the same layout)."""
        pm = self.pm
        flat = pm.flat_parameters()
        opt = pm.optimizer
        saved_opt = state.get("optimizer")
        shapes_ok = state["num_elements"] == pm.shards.num_elements and (opt is None) == (saved_opt is None)
        if shapes_ok and opt is not None:
            shapes_ok = all(k in saved_opt and saved_opt[k].shape == v.shape for k, v in opt.state_tensors().items())
        if not shapes_ok:
            raise UserError(f"the recovery state of {self.path} does not fit this rank's shard of it "
                            f"(another layout or optimizer setting); resume with the settings that wrote it")
        flat.copy_(state["flat"].to(flat.device, flat.dtype))
        if opt is not None:
            opt.load_state_dict(saved_opt)


class ExperimentRuntime(Runtime):
    """Config, output folder, metrics, checkpoints and recovery for the experiments' runtimes.

    Construction is a collective over every rank when ``recover_mode`` is not ``disabled``
    (``recovery.Recovery.open``)."""

    experiment = ""
    #: Does the runtime track every trained model and its runtime state? (Else recover_mode must be disabled.)
    supports_recovery = False

    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        self.plan, self.rank, self.device = plan, rank, device
        self.cfg = config_from_dict(self.experiment, plan.config)
        self.out_dir = trial_dir_of(self.cfg)
        torch.manual_seed(self.cfg.seed)
        self._started_s = time.time()  # the progress report's first step includes building the models
        self.metrics: Optional[MetricsWriter] = None
        self.pending: dict[int, dict] = {}
        self._check_recover_mode(self.cfg)
        self.recovery = recovery.Recovery.open(self.out_dir, self.cfg.recover_mode.value, plan, rank)
        self._resume_state: Optional[dict] = self.recovery.load()
        self._tracked: dict[str, ModelHandle] = {}
        self._restored = False

    @classmethod
    def check_plan(cls, plan: Plan) -> None:
        """Before any process starts: ``recover_mode=resume`` with nothing to resume, or a state written by
        another plan or configuration, is a ``UserError``. Subclasses that override this call it."""
        cfg = config_from_dict(cls.experiment, plan.config)
        cls._check_recover_mode(cfg)
        recovery.find_resume_state(trial_dir_of(cfg), cfg.recover_mode.value, plan)

    @classmethod
    def _check_recover_mode(cls, cfg) -> None:
        if cfg.recover_mode.value != "disabled" and not cls.supports_recovery:
            raise NotAvailableYet(f"recover_mode={cfg.recover_mode.value} is not available for the {cls.experiment} "
                                  f"experiment yet (issue 9); use recover_mode=disabled")

    # -- checkpoints --------------------------------------------------------------------------------
    def epoch_end(self, step: int) -> tuple[bool, int]:
        """(does 0-based ``step`` end an epoch, its 1-based epoch); override when epochs are not equal parts."""
        per_epoch = max(1, self.num_steps() // max(1, self.cfg.total_train_epochs))
        return (step + 1) % per_epoch == 0 or step + 1 == self.num_steps(), step // per_epoch + 1

    def checkpoint_due(self, step: int) -> bool:
        """Save after 0-based ``step``: every ``save_freq_steps``, every ``save_freq_epochs`` and after the last.
        The same on every rank (HF exports in ``run_call``, recovery state in ``end_step``)."""
        c = self.cfg
        epoch_end, epoch = self.epoch_end(step)
        return (step + 1 == self.num_steps() or bool(c.save_freq_steps and (step + 1) % c.save_freq_steps == 0)
                or bool(epoch_end and c.save_freq_epochs and epoch % c.save_freq_epochs == 0))

    def checkpoint_path(self, role: str, step: int) -> str:
        """``checkpoints/{role}/step{step}`` (``step``: steps done, 1-based)."""
        return recovery.checkpoint_path(self.out_dir, role, step)

    # -- recovery -----------------------------------------------------------------------------------
    def trained_model(self, ctx: CallContext, model_cfg) -> ModelHandle:
        """The one trained model of a single-model experiment (SFT, RW): built at its first call from
        ``model_cfg`` and tracked for checkpoints and recovery; ``self.model`` afterwards."""
        if getattr(self, "model", None) is None:
            self.model = self.track("default", ModelHandle.build(
                ctx, model_cfg, self.cfg.seed, trainable=True, total_steps=self.num_steps(),
                train_resident=self.keeps_train_resident(ctx.call.name)))
        return self.model

    def track(self, key: str, handle: ModelHandle) -> ModelHandle:
        """Declare ``handle`` (weights of record with their optimizer) part of the recovery state under
        ``key`` (e.g. its role); when resuming, its saved state is loaded now. Returns ``handle``."""
        self._tracked[key] = handle
        if self._resume_state is not None:
            saved = self._resume_state["models"].get(key)
            if saved is None:
                raise UserError(f"the recovery state of step {self.recovery.resume_step} has no model {key!r} on "
                                f"rank {self.rank}; resume with the settings that wrote it")
            handle.load_training_state(saved)
        return handle

    def runtime_state(self) -> dict:
        """State of this rank outside the tracked models that the next steps depend on (tensors, numbers,
        strings, lists, dicts: ``torch.load(weights_only=True)`` must read it). PPO: value normaliser and KL
        controller. The data position is not part of it: it is the step."""
        return {}

    def load_runtime_state(self, state: dict) -> None:
        """Restore what ``runtime_state`` returned (called before the first resumed step)."""

    def first_step(self) -> int:
        """0, or the saved state's next step; the first call restores the runtime state and every RNG."""
        if self._resume_state is None:
            return 0
        if not self._restored:
            self._restored = True
            self.load_runtime_state(self._resume_state["runtime"])
            recovery.set_rng_state(self._resume_state["rng"], self.device)
        return int(self._resume_state["next_step"])

    def _save_recovery_state(self, next_step: int) -> None:
        self.recovery.save(next_step, {"rng": recovery.rng_state(self.device), "runtime": self.runtime_state(),
                                       "models": {k: h.training_state() for k, h in self._tracked.items()}})

    def keeps_frozen_resident(self, role: str) -> bool:
        """Does a frozen model of ``role`` stay on this rank's devices between its calls (so its inference
        forward may replay CUDA graphs)? Not when it waits in host memory (``offload_frozen_models`` and the
        devices serve another model)."""
        return not (self.cfg.memory.offload_frozen_models and self.shares_devices(role))

    def keeps_train_resident(self, call_name: str) -> bool:
        """May the train call ``call_name`` replay its micro-batches from CUDA graphs on this rank: do its
        devices serve no other call? Where they do, the memory policy may move the training state to host
        memory between steps (which drops the graphs), and the graphs' pools — static gradients and one
        micro-batch's activations — would stay reserved through the other calls. The planner's rule is the
        same (``tables.cost_candidate``: the eager time wherever the call shares its devices)."""
        return has_devices_to_itself(self.plan, self.rank, call_name)

    def shares_devices(self, role: str) -> bool:
        """Does this rank also serve a call of another model? (Then frozen models wait in host memory.)"""
        return any(c.role != role and self.rank in self.plan.placements[c.name].devices for c in self.plan.calls)

    def record(self, step: int, figures: dict) -> None:
        """Rank 0: add figures for ``step`` (1-based in metrics); written at the end of the step."""
        self.pending.setdefault(step, {}).update(figures)

    def end_step(self, step: int, rank: int) -> None:
        """Rank 0 writes the step's metrics; then, on checkpoint steps, every rank its recovery state."""
        if rank == 0:
            if self.metrics is None:
                self.metrics = MetricsWriter(self.out_dir, self.num_steps(), resume_from_step=self.first_step(),
                                             start_s=self._started_s)
            self.metrics.write(step + 1, self.pending.pop(step, {}))
            if step + 1 == self.num_steps():
                self.metrics.close()
        if self.recovery.saving and self.checkpoint_due(step):
            self._save_recovery_state(step + 1)


def steps_per_epoch(num_entries: int, batch_size: int) -> int:
    return max(1, math.ceil(num_entries / max(1, batch_size)))
