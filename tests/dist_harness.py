"""Real multi-process tests on CPU: fork N gloo workers once, run a whole suite of checks in them.

``run_workers(n, fn, *args)`` forks ``n`` processes (fork is ~10x faster to start than spawn), initialises
gloo over loopback in each (one thread each, 60 s collective timeout), calls ``fn(rank, world_size, *args)``
and returns the per-rank results (picklable). The first failure (an exception on any rank, a crash, or the
overall timeout) kills every worker and raises ``WorkerError`` naming the rank, with its traceback, so a
hung collective never outlives the test.

Everything the workers need is captured at fork time (references computed in the parent, paths): nothing
is pickled on the way in, only results on the way out.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from executor.launch import _die_with_parent, free_port


class WorkerError(AssertionError):
    pass


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, conn, parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    code = 0
    try:
        import torch

        from executor import comm

        torch.set_num_threads(1)
        comm.init(rank, world, "gloo", f"tcp://127.0.0.1:{port}", timeout_s=60.0)
        result = fn(rank, world, *args)
        conn.send(("ok", rank, result))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        code = 1
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_workers(world_size: int, fn: Callable[..., Any], *args, timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked gloo workers; results in rank order."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, send, os.getpid()),
                        name=f"dist-test-rank{rank}")
        p.start()
        send.close()
        procs.append(p)
        conns.append(recv)
    results: dict[int, Any] = {}
    deadline = time.time() + timeout_s
    ok = False
    try:
        pending = {c: r for r, c in enumerate(conns)}
        while pending:
            left = deadline - time.time()
            if left <= 0:
                raise WorkerError(f"timeout after {timeout_s:.0f} s; ranks still running: {sorted(pending.values())}")
            for c in mp.connection.wait(list(pending), timeout=min(left, 1.0)):
                rank = pending.pop(c)
                try:
                    kind, r, payload = c.recv()
                except EOFError:
                    procs[rank].join(1.0)
                    raise WorkerError(f"rank {rank} died (exit code {procs[rank].exitcode})") from None
                if kind == "error":
                    raise WorkerError(f"rank {r} failed: {payload}")
                results[r] = payload
        ok = True
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if ok:  # every rank reported and is exiting on its own
                p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join()
