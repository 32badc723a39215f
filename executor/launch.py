"""Local launcher: one worker process per device of the plan's cluster, on this machine.

CPU: fork (10× faster to start than spawn), gloo, one thread per worker. GPU: spawn (never fork after
CUDA is initialised), NCCL. Rendezvous over loopback TCP. Workers stay children of the launcher
(same session, not daemonised) and die with it (PR_SET_PDEATHSIG).

Failure: a worker that raises reports its traceback to the launcher and exits non-zero; the launcher
watches every child, and on the first failure (an exception or a kill) prints the failing rank and its
error, kills the others and returns non-zero. Survivors never wait out a 30-minute collective timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from typing import Optional

from reallm.errors import UserError
from reallm.plan import Plan

KILL_GRACE_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _entry(rank, world, backend, init_method, plan, factory, errq, launcher_pid):
    _die_with_parent()
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from executor.worker import run_worker

    try:
        run_worker(plan, rank, world, backend, init_method, factory)
    except BaseException as e:  # report everything, including KeyboardInterrupt, then exit non-zero
        errq.put((rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(plan: Plan, plan_path: Optional[str] = None, runtime_factory=None, verbose: bool = True) -> int:
    """Run ``plan`` with one process per device; returns the job's exit code."""
    from executor.runtime import default_runtime_factory, runtime_class

    if runtime_factory is None:
        cls = runtime_class(plan)  # a clear error now, before any process starts
        if hasattr(cls, "check_plan"):
            cls.check_plan(plan)
        runtime_factory = default_runtime_factory(plan_path)
    world = plan.cluster.num_devices
    gpu = plan.cluster.device_kind == "gpu"
    check_machine(plan, world)
    backend = "nccl" if gpu else "gloo"
    ctx = mp.get_context("spawn" if gpu else "fork")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    errq = ctx.SimpleQueue()
    procs = []
    for rank in range(world):
        p = ctx.Process(target=_entry, name=f"reallm-rank{rank}",
                        args=(rank, world, backend, init_method, plan, runtime_factory, errq, os.getpid()))
        p.start()
        procs.append(p)
    try:
        return _watch(procs, errq, verbose)
    finally:
        _kill_all(procs)


def check_machine(plan: Plan, world: int) -> None:
    """A plan for GPUs needs that many GPUs here (mode=local runs every rank on this machine)."""
    import torch

    cl = plan.cluster
    if cl.device_kind != "gpu":
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < world:
        fix = (f"n_gpus_per_node={have} (or mode=torchrun across nodes)" if have else
               "cluster=cpu to run on CPU worker processes")
        raise UserError(f"the plan is for {world} GPU(s) ({cl.n_nodes} node(s) × {cl.n_devices_per_node} "
                        f"{cl.gpu_name}) but this machine has {have}; plan again with {fix}")


def _watch(procs, errq, verbose: bool) -> int:
    alive = {p.sentinel: (rank, p) for rank, p in enumerate(procs)}
    while alive:
        ready = mp.connection.wait(list(alive), timeout=1.0)
        for s in ready:
            rank, p = alive.pop(s)
            p.join()
            if p.exitcode != 0:
                time.sleep(0.2)  # let a raising rank's report arrive
                errors = []
                while not errq.empty():
                    errors.append(errq.get())
                _report(rank, p.exitcode, errors, verbose)
                return 1
    return 0


def _report(rank: int, exitcode: int, errors: list, verbose: bool) -> None:
    first = min(errors, key=lambda e: e[0] != rank) if errors else None
    if first is not None:
        r, msg, tb = first
        print(f"error: rank {r} failed: {msg}", file=sys.stderr)
        if verbose:
            print(f"--- traceback of rank {r} ---\n{tb.rstrip()}", file=sys.stderr)
    else:
        how = f"killed by signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}"
        print(f"error: rank {rank} died ({how}); stopping every rank", file=sys.stderr)


def _kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + KILL_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
