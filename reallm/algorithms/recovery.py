"""Checkpoints and exact recovery: atomic HF exports, and per-rank training state to resume from.

Two different things live in a trial directory ``{output_dir}/{experiment_name}/{trial_name}/``:

**HF exports** (for people and other experiments; bf16 on GPU, so *not* recovery state)::

    checkpoints/{role}/step{N}/          an HF checkpoint (config.json, *.safetensors, tokenizer files)
    checkpoints/{role}/.step{N}.tmp/     being written; renamed to step{N} when whole (``publish_dir``)
    checkpoints/{role}/.step{N}.old/     a previous step{N} being replaced

Written at ``save_freq_steps`` / ``save_freq_epochs`` and always after the last step. Names that are
not ``step{N}`` are temporary: readers ignore them (``list_checkpoints``, ``latest_checkpoint``).

**Recovery state** (``recover_mode`` save | auto | resume; the same N as every HF export)::

    recover/step{N}/rank{r}.pt      every rank r writes its own (temp file + os.replace), torch.save of
        {"format": 1, "next_step": N, "rank": r, "world_size": W,
         "rng": {"torch": ByteTensor, "cuda": ByteTensor | None, "python": random.getstate(),
                 "numpy": (name, keys, pos, has_gauss, cached_gaussian) | None},
         "runtime": ExperimentRuntime.runtime_state()         (PPO: value normaliser, KL controller, …),
         "models": {key: {"flat": this rank's flat parameter buffer (model dtype),
                          "optimizer": FlatAdamW.state_dict(): num_updates (= the LR schedule position),
                                       exp_avg, exp_avg_sq and, when they are not the parameters
                                       themselves, the fp32 masters (ZeRO-1: this rank's shard),
                          "num_elements": int}}}
    recover/step{N}/COMPLETE        JSON, written by rank 0 after a barrier over every rank, last:
        {"format": 1, "next_step": N, "world_size": W, "fingerprint": {experiment, world_size,
         placements, config}}

``next_step`` N is the data position: the run continues with 0-based step N (every rank derives the
epoch and the step's sequences from it and the seed). A step directory without ``COMPLETE`` is
incomplete (a crash while writing) and is discarded; after a new marker, older states are removed (the
marker first, so a half-removed state is never taken for a complete one).

Resume (``resume``: required, ``auto``: if there is one): rank 0 picks the newest complete state, checks
that the plan and the configuration match the ones that wrote it (``fingerprint``; only keys that
change neither the math nor the layout may differ, ``RESUMABLE_CONFIG_KEYS``), removes what the
discarded timeline left (incomplete states, temporary names, HF exports and metrics lines after N) and
tells every rank N. A fresh start with saving on clears ``recover/`` first, so a later resume can never
pick a state of an earlier run of the same trial. The trial directory must be on a filesystem that
every node sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Optional

import torch

from reallm.errors import UserError

FORMAT = 1
RECOVER_DIR = "recover"
CHECKPOINT_DIR = "checkpoints"
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step(\d+)$")

#: Top-level config keys that may differ between the run that saved a state and the one resuming it:
#: they change neither the math nor the layout (placements are compared on their own).
RESUMABLE_CONFIG_KEYS = frozenset({"recover_mode", "mode", "save_freq_steps", "save_freq_epochs",
                                   "eval_freq_epochs", "memory", "allocation_mode", "allocation", "output_dir",
                                   "cluster", "n_nodes", "n_gpus_per_node"})


# -- names and atomic directories ------------------------------------------------------------------------------


def step_of(name: str) -> Optional[int]:
    """N for ``step{N}``; None for anything else (temporary names included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(role_dir: str) -> list[tuple[int, str]]:
    """(N, path) of the whole ``step{N}`` directories under ``role_dir``, by N; temporary names ignored."""
    if not os.path.isdir(role_dir):
        return []
    out = [(step_of(n), os.path.join(role_dir, n)) for n in os.listdir(role_dir)]
    return sorted((n, p) for n, p in out if n is not None and os.path.isdir(p))


def latest_checkpoint(role_dir: str) -> Optional[str]:
    """The newest whole HF export under ``checkpoints/{role}``, or None."""
    found = list_checkpoints(role_dir)
    return found[-1][1] if found else None


def checkpoint_path(trial_dir: str, role: str, step: int) -> str:
    return os.path.join(trial_dir, CHECKPOINT_DIR, role, f"step{step}")


def temp_path(final: str) -> str:
    """The sibling a directory is written under before ``publish_dir`` renames it to ``final``."""
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, f".{name}.tmp")


def publish_dir(tmp: str, final: str) -> None:
    """Rename the whole directory ``tmp`` to ``final`` (same filesystem: atomic). An existing ``final`` (a
    re-run step) is first renamed aside, so ``final`` is always either the old or the new whole copy."""
    if os.path.exists(final):
        aside = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_atomically(path: str, write) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- random number generators -----------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a rank draws from: torch CPU, this rank's CUDA device, Python, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None,
                             "numpy": None}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (str(name), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# -- what must match to resume --------------------------------------------------------------------------------


def fingerprint(plan) -> dict:
    """What a recovery state is only valid for: the experiment, world size, every call's placement (the rank
    files hold that layout's shards) and the configuration keys that change the math or the data."""
    call_names = {c.name for c in plan.calls}
    fp = {"experiment": plan.experiment, "world_size": plan.cluster.num_devices,
          "placements": {c.name: plan.placements[c.name].to_dict() for c in plan.calls},
          "config": {k: v for k, v in plan.config.items() if k not in RESUMABLE_CONFIG_KEYS and k not in call_names}}
    return json.loads(json.dumps(fp))  # as the marker reads back (tuples become lists)


def _flat_items(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat_items(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """``key: saved → now`` for every leaf that differs (dotted keys)."""
    a, b = _flat_items(saved), _flat_items(now)
    return [f"{k}: {a.get(k, '(absent)')!r} then, {b.get(k, '(absent)')!r} now" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


# -- the recovery directory -------------------------------------------------------------------------------------


def recover_root(trial_dir: str) -> str:
    return os.path.join(trial_dir, RECOVER_DIR)


def state_dir(trial_dir: str, step: int) -> str:
    return os.path.join(recover_root(trial_dir), f"step{step}")


def read_marker(step_dir: str) -> Optional[dict]:
    """The marker of a complete state, or None (absent, or unreadable: a crash while writing it)."""
    try:
        with open(os.path.join(step_dir, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def complete_states(trial_dir: str) -> list[tuple[int, dict]]:
    """(N, marker) of the complete recovery states, by N."""
    root = recover_root(trial_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        n = step_of(name)
        marker = read_marker(os.path.join(root, name)) if n is not None else None
        if marker is not None:
            out.append((n, marker))
    return sorted(out, key=lambda t: t[0])


def find_resume_state(trial_dir: str, mode: str, plan) -> Optional[int]:
    """The N to resume from for ``recover_mode`` ``mode`` (None: start fresh). Read-only; a ``UserError``
    naming what to do when ``resume`` finds nothing, or when the newest state was written by another
    plan or configuration."""
    if mode not in ("resume", "auto"):
        return None
    states = complete_states(trial_dir)
    if not states:
        if mode == "resume":
            raise UserError(f"recover_mode=resume: no complete recovery state under {recover_root(trial_dir)} "
                            f"(a state is complete once its {MARKER} marker is written). Run with "
                            f"recover_mode=save (or auto) first, check experiment_name / trial_name / output_dir, "
                            f"or use recover_mode=auto to start fresh when there is nothing to resume.")
        return None
    n, marker = states[-1]
    diffs = fingerprint_differences(marker.get("fingerprint", {}), fingerprint(plan))
    if diffs:
        shown = "\n".join(f"  - {d}" for d in diffs[:12])
        raise UserError(f"recover_mode={mode}: the recovery state {state_dir(trial_dir, n)} was written by a run "
                        f"with another plan or configuration:\n{shown}\nResume with the same settings (and "
                        f"allocation), or start over in a new trial_name (or with recover_mode=save, which "
                        f"discards it).")
    return n


def _remove_state(path: str) -> None:
    try:  # the marker first: a half-removed state must never look complete
        os.remove(os.path.join(path, MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def clean_for_fresh_start(trial_dir: str) -> None:
    """Rank 0, before any rank writes: no state of an earlier run of this trial may be resumed later."""
    root = recover_root(trial_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            _remove_state(os.path.join(root, name))


def clean_for_resume(trial_dir: str, step: int) -> None:
    """Rank 0, before any rank writes: drop what the discarded timeline after ``step`` left behind (other
    recovery states, temporary names, HF exports after ``step``, metrics lines after ``step``)."""
    root = recover_root(trial_dir)
    for name in os.listdir(root):
        if step_of(name) != step:
            _remove_state(os.path.join(root, name))
    ckpt_root = os.path.join(trial_dir, CHECKPOINT_DIR)
    if os.path.isdir(ckpt_root):
        for role in os.listdir(ckpt_root):
            role_dir = os.path.join(ckpt_root, role)
            for name in os.listdir(role_dir) if os.path.isdir(role_dir) else []:
                n = step_of(name)
                if n is None or n > step:
                    shutil.rmtree(os.path.join(role_dir, name), ignore_errors=True)
    truncate_metrics(os.path.join(trial_dir, "metrics.jsonl"), step)


def truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of steps <= ``step`` (and nothing unparsable: a line cut by the crash)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
                keep.append(json.dumps(rec) + "\n")
    _write_atomically(path, lambda f: f.write("".join(keep).encode()))


def write_rank_state(trial_dir: str, step: int, rank: int, state: dict) -> None:
    d = state_dir(trial_dir, step)
    os.makedirs(d, exist_ok=True)
    _write_atomically(os.path.join(d, f"rank{rank}.pt"), lambda f: torch.save(state, f))


def write_marker(trial_dir: str, step: int, marker: dict) -> None:
    """Rank 0, after every rank's file is written: the state is complete; older states are removed."""
    d = state_dir(trial_dir, step)
    _write_atomically(os.path.join(d, MARKER), lambda f: f.write(json.dumps(marker, indent=1).encode()))
    for n, _ in complete_states(trial_dir):
        if n < step:
            _remove_state(state_dir(trial_dir, n))


def read_rank_state(trial_dir: str, step: int, rank: int) -> dict:
    path = os.path.join(state_dir(trial_dir, step), f"rank{rank}.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing although the state is marked complete") from None
    if state.get("format") != FORMAT or state.get("next_step") != step or state.get("rank") != rank:
        raise UserError(f"{path} is not rank {rank}'s recovery state of step {step}")
    return state


class Recovery:
    """One rank's view of its trial's recovery state (module docstring).

    ``open`` is a collective over every rank when ``recover_mode`` is not ``disabled``: rank 0 decides
    (resume step, cleaning) and tells the others, so no rank writes before rank 0 has cleaned.
    """

    def __init__(self, trial_dir: str, mode: str, rank: int, world_size: int, fp: dict,
                 resume_step: Optional[int]):
        self.trial_dir, self.mode, self.rank, self.world_size = trial_dir, mode, rank, world_size
        self.fingerprint = fp
        self.resume_step = resume_step

    @property
    def saving(self) -> bool:
        return self.mode in ("save", "auto", "resume")

    @classmethod
    def open(cls, trial_dir: str, mode: str, plan, rank: int) -> Recovery:
        from executor import comm

        world = comm.world()
        if mode == "disabled":
            return cls(trial_dir, mode, rank, world.size, {}, None)
        decision: Any = None
        if rank == 0:
            try:
                step = find_resume_state(trial_dir, mode, plan)
                if step is None:
                    clean_for_fresh_start(trial_dir)
                else:
                    clean_for_resume(trial_dir, step)
                decision = ("ok", step)
            except UserError as e:
                decision = ("error", str(e))
        decision = comm.all_gather_objects(decision, world)[0]
        if decision[0] == "error":
            raise UserError(decision[1])
        return cls(trial_dir, mode, rank, world.size, fingerprint(plan), decision[1])

    def load(self) -> Optional[dict]:
        """This rank's saved state when resuming, else None."""
        if self.resume_step is None:
            return None
        return read_rank_state(self.trial_dir, self.resume_step, self.rank)

    def save(self, next_step: int, state: dict) -> None:
        """Every rank: write my file; barrier over every rank; rank 0 writes the marker."""
        from executor import comm

        write_rank_state(self.trial_dir, next_step, self.rank,
                         {"format": FORMAT, "next_step": next_step, "rank": self.rank,
                          "world_size": self.world_size, **state})
        comm.world_barrier()
        if self.rank == 0:
            write_marker(self.trial_dir, next_step, {"format": FORMAT, "next_step": next_step,
                                                     "world_size": self.world_size,
                                                     "fingerprint": self.fingerprint})
