"""Reallocation executed between the seed's PPO placements, one process per device (issue 13, item 1).

    torchrun --nproc-per-node 8 bench/bench_realloc_dist.py [--model llama-7b] [--pairs seed] [--out r.json]

NCCL and bf16 on CUDA (default model llama-7b), gloo and fp32 on CPU (default model ``tiny``, seconds).
``--pairs seed`` is the seed's PPO command (shared/seed/quickstart.rst, configs/ppo.yaml):
actor ``tp8 > pp2dp4`` (actor_train → actor_gen) and critic ``tp8 > tp4pp2`` (critic_train → critic_inf,
a critic spec); each pair runs both ways. Other pairs: ``--pairs actor:tp8>tp2pp2dp2,critic:dp8>tp8``.

Data. Every rank fills its A buffer from *global coordinates*, never from full parameters: element
(row, col) of parameter k gets ``value(k, row * num_cols + col)``, a 32-bit mix of both turned into a
bit pattern with exponent in [2^-7, 2^8), so it is exact in the buffer dtype, never 0, NaN or inf
(``coord_values``). Vocabulary padding stays 0. The same function gives every rank's expected B buffer,
so the check compares bit patterns (mismatches all-reduced: every rank raises together, none hangs);
the way back B → A must restore A bit for bit.

Measurement. Per direction: ``--warmup`` runs (the first prepares the CUDA interval arguments), then
``--iters`` runs of ``executor.realloc.run_realloc``, each between a barrier and a device sync; one
run's time ``t_s`` is the maximum over ranks, and the table reports the median run. Bytes are the
plan's non-local messages (local copies excluded):

    aggregate_GBps  = moved_bytes / t_s                       (all devices together)
    rank_GBps[r]    = max(sent_bytes[r], recv_bytes[r]) / t_s (NVLink is full duplex: a device sends
                                                               and receives at link rate at once)
    bottleneck_GBps = max_r rank_GBps[r]                      (the busiest device sets the time)
    link_fraction   = bottleneck_GBps / p2p_GBps

Link. ``p2p``: rank 0 sends ``--link-bytes`` (default: the largest realloc message) to rank 1 alone,
the "measured NVLink bandwidth" the target (link_fraction >= 0.7) refers to; ``bidir``: 0 ↔ 1 at once
(per direction); ``ring``: every rank to the next at once; ``all_pairs``: every rank sends the same
total split over all others at once (the realloc's pattern). Each is per device, one direction.

On the 8-GPU machine: leave NVLink multicast off (``NCCL_NVLS_ENABLE=0``, set here unless given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from executor import comm  # noqa: E402
from executor.realloc import run_realloc  # noqa: E402
from reallm.layout import param_table, plan_realloc, shards_of  # noqa: E402
from reallm.placement import Placement  # noqa: E402
from reallm.spec import ModelSpec, preset_spec  # noqa: E402

SEED_PAIRS = "actor:tp8>pp2dp4,critic:tp8>tp4pp2"
#: Small enough for seconds on 8 gloo processes; vocab 37 pads under tp 4 and 8, 2 kv heads replicate.
TINY = ModelSpec(
    family="llama",
    num_layers=4,
    hidden_size=32,
    intermediate_size=64,
    num_heads=8,
    num_kv_heads=2,
    head_dim=4,
    vocab_size=37,
    source="tiny",
)
GB = 1e9
_M32 = 0xFFFFFFFF
#: Elements per fill chunk: bounds the int64 temporaries (7B's full embedding is 131M elements).
_FILL_CHUNK = 1 << 24
#: dtype → (bits, mantissa bits, exponent field of 2^-7, integer dtype of the same width).
_FLOAT_BITS = {
    torch.float32: (32, 23, 127 - 7, torch.int32),
    torch.bfloat16: (16, 7, 127 - 7, torch.int16),
    torch.float16: (16, 10, 15 - 7, torch.int16),
}


class ReallocMismatch(AssertionError):
    """A reallocated buffer differs from the one cut from global coordinates."""


# -- the fill: values from global coordinates ---------------------------------------------------------


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mix (xorshift-multiply) on int64 values in [0, 2^32); products stay < 2^59."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def coord_values(param_index: int, flat_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value of parameter ``param_index`` at full row-major index ``flat_index`` (int64), in ``dtype``:
    sign, 4 exponent bits and the mantissa come from the mix, so the value is exact and never 0."""
    bits, mant, exp0, int_dtype = _FLOAT_BITS[dtype]
    key = (param_index * 0x9E3779B1 + 0x7F4A7C15) & _M32
    h = _mix32((flat_index ^ key) & _M32)
    sign = (h >> 31) & 1
    pattern = (sign << (bits - 1)) | ((exp0 + ((h >> mant) & 15)) << mant) | (h & ((1 << mant) - 1))
    pattern = pattern - (sign << bits)  # two's complement of the integer view
    return pattern.to(int_dtype).view(dtype)


def fill_buffer(
    spec: ModelSpec, placement: Placement, device: int, dtype: torch.dtype, torch_device: torch.device
) -> torch.Tensor:
    """``device``'s flat buffer under ``placement`` (the ``reallm.layout.shards`` convention), computed
    shard by shard from global coordinates; padding rows stay 0."""
    ds = shards_of(spec, placement, device)
    index = {p.name: i for i, p in enumerate(param_table(spec))}
    shape = {p.name: p.shape for p in param_table(spec)}
    flat = torch.zeros(ds.num_elements, dtype=dtype, device=torch_device)
    for s in ds.shards:
        local = flat[s.offset : s.offset + s.num_elements].view(s.local_shape)
        k = index[s.name]
        if len(s.box) == 1:
            ((lo, hi),) = s.box
            local[: hi - lo] = coord_values(k, torch.arange(lo, hi, device=torch_device), dtype)
            continue
        (r0, r1), (c0, c1) = s.box
        num_cols = shape[s.name][1]
        cols = torch.arange(c0, c1, device=torch_device)
        rows_per_chunk = max(1, _FILL_CHUNK // max(1, c1 - c0))
        for lo in range(r0, r1, rows_per_chunk):
            hi = min(r1, lo + rows_per_chunk)
            idx = torch.arange(lo, hi, device=torch_device)[:, None] * num_cols + cols[None, :]
            local[lo - r0 : hi - r0, : c1 - c0] = coord_values(k, idx, dtype)
    return flat


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_FLOAT_BITS[t.dtype][3])


def check_buffer(got: Optional[torch.Tensor], want: Optional[torch.Tensor], what: str) -> int:
    """Mismatching elements on this rank, all-reduced over the world; raises on every rank if any."""
    bad = 0 if got is None else int((_bits(got) != _bits(want)).sum())
    counts = comm.all_gather_objects(bad, comm.world())
    if sum(counts):
        ranks = {r: n for r, n in enumerate(counts) if n}
        raise ReallocMismatch(f"{what}: {sum(counts)} elements differ from the expected buffer (per rank {ranks})")
    return 0


# -- pairs --------------------------------------------------------------------------------------------


def parse_layout(text: str) -> Placement:
    """``tp8``, ``pp2dp4``, ``tp4pp2``: degrees in any order (missing = 1) on devices 0..n-1."""
    parts = re.findall(r"(tp|pp|dp)(\d+)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"layout {text!r}: write degrees as e.g. tp8, pp2dp4, tp2pp2dp2")
    deg = {a: int(b) for a, b in parts}
    n = math.prod(deg.values())
    return Placement(tuple(range(n)), dp=deg.get("dp", 1), tp=deg.get("tp", 1), pp=deg.get("pp", 1))


@dataclass(frozen=True)
class Pair:
    """One reallocation pair: a model (actor or critic shape) between two layouts, run both ways."""

    role: str
    a_text: str
    b_text: str
    spec: ModelSpec
    a: Placement
    b: Placement


def parse_pairs(text: str, spec: ModelSpec) -> list[Pair]:
    """``seed`` or ``role:A>B,...`` with role ``actor`` (the spec) or ``critic`` (its critic variant)."""
    out = []
    for item in (SEED_PAIRS if text == "seed" else text).split(","):
        m = re.fullmatch(r"(actor|critic):(\w+)>(\w+)", item.strip())
        if not m:
            raise ValueError(f"pair {item!r}: write role:A>B, e.g. actor:tp8>pp2dp4 (role actor or critic)")
        role, a, b = m.groups()
        out.append(Pair(role, a, b, spec.with_critic(role == "critic"), parse_layout(a), parse_layout(b)))
    return out


def parse_model(text: str) -> ModelSpec:
    """``tiny`` or ``<class>-<size>b`` (a ``reallm.spec`` preset, e.g. llama-7b, qwen2-0.5b)."""
    if text == "tiny":
        return TINY
    m = re.fullmatch(r"(\w+)-([\d.]+)b", text)
    if not m:
        raise ValueError(f"model {text!r}: write tiny or <class>-<size>b, e.g. llama-7b")
    return preset_spec(m.group(1), float(m.group(2)))


# -- timing -------------------------------------------------------------------------------------------


@dataclass
class Timer:
    """Times a collective step: barrier, run, device sync, maximum over ranks."""

    torch_device: torch.device
    times_s: list[float] = field(default_factory=list)

    def __call__(self, fn) -> float:
        world = comm.world()
        comm.barrier(world)
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)  # NCCL's barrier returns before the peers arrive
        t0 = time.perf_counter()
        fn()
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=self.torch_device)
        comm.all_reduce_max(dt, world)
        self.times_s.append(float(dt.item()))
        return self.times_s[-1]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _traffic(plan, element_bytes: int) -> dict:
    sent: dict[int, int] = {}
    recv: dict[int, int] = {}
    largest = 0
    for m in plan.messages:
        if m.is_local:
            continue
        n = m.num_elements * element_bytes
        sent[m.src] = sent.get(m.src, 0) + n
        recv[m.dst] = recv.get(m.dst, 0) + n
        largest = max(largest, n)
    local = sum(m.num_elements for m in plan.messages if m.is_local) * element_bytes
    return dict(
        moved_bytes=sum(sent.values()),
        local_bytes=local,
        largest_message_bytes=largest,
        num_messages=len(plan.messages),
        sent_bytes=sent,
        recv_bytes=recv,
    )


def bench_direction(
    plan,
    rank: int,
    src: Optional[torch.Tensor],
    dst: Optional[torch.Tensor],
    args,
    torch_device: torch.device,
    element_bytes: int,
) -> dict:
    """Warm up, then time ``args.iters`` runs of ``run_realloc`` A → B into ``dst`` (in place)."""
    for _ in range(args.warmup):
        run_realloc(plan, rank, src, dst)
    timer = Timer(torch_device)
    for _ in range(args.iters):
        timer(lambda: run_realloc(plan, rank, src, dst))
    tr = _traffic(plan, element_bytes)
    t_s = _median(timer.times_s)
    devices = sorted(set(plan.a.devices) | set(plan.b.devices))
    rank_bytes = {d: max(tr["sent_bytes"].get(d, 0), tr["recv_bytes"].get(d, 0)) for d in devices}
    return dict(
        **tr,
        times_s=timer.times_s,
        median_s=t_s,
        min_s=min(timer.times_s),
        max_send_bytes=max(tr["sent_bytes"].values(), default=0),
        max_recv_bytes=max(tr["recv_bytes"].values(), default=0),
        aggregate_GBps=tr["moved_bytes"] / t_s / GB,
        rank_GBps={d: b / t_s / GB for d, b in rank_bytes.items()},
        bottleneck_GBps=max(rank_bytes.values(), default=0) / t_s / GB,
    )


def bench_pair(pair: Pair, rank: int, args, dtype: torch.dtype, torch_device: torch.device) -> list[dict]:
    """A → B (checked against B cut from global coordinates), then B → A into a zeroed buffer
    (checked bit for bit against A)."""
    world_size = comm.world().size
    need = max(len(pair.a.devices), len(pair.b.devices))
    if need > world_size:
        raise ValueError(f"pair {pair.role}:{pair.a_text}>{pair.b_text} needs {need} ranks, the job has {world_size}")
    spec, a, b = pair.spec, pair.a, pair.b
    ab = plan_realloc(spec, a, b, devices_per_node=args.devices_per_node)
    ba = plan_realloc(spec, b, a, devices_per_node=args.devices_per_node)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    buf_a = fill_buffer(spec, a, rank, dtype, torch_device) if rank in a.devices else None
    buf_b = (
        torch.zeros(shards_of(spec, b, rank).num_elements, dtype=dtype, device=torch_device)
        if rank in b.devices
        else None
    )

    fwd = bench_direction(ab, rank, buf_a, buf_b, args, torch_device, element_bytes)
    if args.corrupt_rank == rank and buf_b is not None:
        # Test hook: a wrong element must fail the check (a sign flip changes any value but 0, and the
        # fill never writes 0 to a real element).
        first = int(torch.nonzero(buf_b)[0, 0])
        buf_b[first] = -buf_b[first]
    want_b = fill_buffer(spec, b, rank, dtype, torch_device) if rank in b.devices else None
    check_buffer(buf_b, want_b, f"{pair.role} {pair.a_text} -> {pair.b_text}")
    del want_b

    back = torch.zeros_like(buf_a) if buf_a is not None else None
    bwd = bench_direction(ba, rank, buf_b, back, args, torch_device, element_bytes)
    check_buffer(back, buf_a, f"{pair.role} {pair.b_text} -> {pair.a_text} (round trip)")
    return [
        dict(role=pair.role, src=pair.a_text, dst=pair.b_text, **fwd, verified=True),
        dict(role=pair.role, src=pair.b_text, dst=pair.a_text, **bwd, verified=True),
    ]


# -- the link -----------------------------------------------------------------------------------------


def bench_link(
    rank: int, world_size: int, num_bytes: int, args, dtype: torch.dtype, torch_device: torch.device
) -> dict:
    """Per-device one-direction GB/s of four point-to-point patterns of ``num_bytes`` (module docstring)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    n = max(1, num_bytes // element_bytes)
    num_bytes = n * element_bytes
    send = torch.ones(n, dtype=dtype, device=torch_device)
    recv = torch.empty(n, dtype=dtype, device=torch_device)
    peers = [p for p in range(world_size) if p != rank]
    split = max(1, n // max(1, len(peers)))
    send_parts = [send[i * split : (i + 1) * split] for i in range(len(peers))]
    recv_parts = [recv[i * split : (i + 1) * split] for i in range(len(peers))]
    patterns = {
        "p2p": ([(send, 1)] if rank == 0 else [], [(recv, 0)] if rank == 1 else [], num_bytes),
        "bidir": ([(send, 1 - rank)] if rank < 2 else [], [(recv, 1 - rank)] if rank < 2 else [], num_bytes),
        "ring": ([(send, (rank + 1) % world_size)], [(recv, (rank - 1) % world_size)], num_bytes),
        "all_pairs": (list(zip(send_parts, peers)), list(zip(recv_parts, peers)), split * element_bytes * len(peers)),
    }
    out = {}
    for name, (sends, recvs, per_device_bytes) in patterns.items():
        if world_size < 2:
            break
        for _ in range(args.warmup):
            comm.exchange(sends, recvs)
        timer = Timer(torch_device)
        for _ in range(args.iters):
            timer(lambda s=sends, r=recvs: comm.exchange(s, r))
        t_s = _median(timer.times_s)
        out[name] = dict(bytes=per_device_bytes, median_s=t_s, GBps=per_device_bytes / t_s / GB)
    return out


# -- driver -------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tiny or <class>-<size>b (default: llama-7b on CUDA, tiny on CPU)")
    ap.add_argument("--pairs", default="seed", help=f"seed (= {SEED_PAIRS}) or role:A>B,...")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per direction (default 10 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--devices-per-node", type=int, default=8)
    ap.add_argument("--link-bytes", type=int, default=None, help="link test size (default: largest realloc message)")
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="collective timeout")
    ap.add_argument("--target", type=float, default=0.7, help="link fraction the realloc should reach")
    ap.add_argument("--corrupt-rank", type=int, default=None, help="test hook: flip one received element here")
    ap.add_argument("--out", default=None, help="write the results as JSON (rank 0)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, rank: int) -> dict:
    """The benchmark on an initialised process group; every rank returns the same results."""
    args = argparse.Namespace(**vars(args))
    world_size = comm.world().size
    on_cuda = dist.get_backend() == "nccl"
    torch_device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    if args.iters is None:
        args.iters = 10 if on_cuda else 3
    spec = parse_model(args.model or ("llama-7b" if on_cuda else "tiny"))
    pairs = parse_pairs(args.pairs, spec)

    results = []
    for pair in pairs:
        results += bench_pair(pair, rank, args, dtype, torch_device)
        if on_cuda:
            torch.cuda.empty_cache()  # the next pair's buffers, not this one's, should fill the device
    largest = max((r["largest_message_bytes"] for r in results), default=0)
    link = bench_link(rank, world_size, args.link_bytes or largest or (1 << 20), args, dtype, torch_device)
    p2p = link.get("p2p", {}).get("GBps")
    for r in results:
        r["link_fraction"] = r["bottleneck_GBps"] / p2p if p2p else None
        r["all_pairs_fraction"] = r["bottleneck_GBps"] / link["all_pairs"]["GBps"] if "all_pairs" in link else None
    env = dict(
        backend=dist.get_backend(),
        world_size=world_size,
        dtype=str(dtype).removeprefix("torch."),
        model=spec.source or args.model,
        num_params=spec.num_params,
        torch=torch.__version__,
        devices_per_node=args.devices_per_node,
        iters=args.iters,
        warmup=args.warmup,
        nccl_env={k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
    )
    if on_cuda:
        from reallm.kernels.intervals import intervals_cuda_available

        env.update(
            device=torch.cuda.get_device_name(torch_device),
            interval_kernel=intervals_cuda_available(),
            nccl=str(torch.cuda.nccl.version()),
        )
    return dict(env=env, link=link, pairs=results, target=args.target)


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def format_table(res: dict) -> str:
    link, env = res["link"], res["env"]
    lines = [
        f"{env['model']} ({_count(env['num_params'])} params, {env['dtype']}, {env['backend']}, "
        f"{env['world_size']} ranks, median of {env['iters']} runs)",
        "",
    ]
    lines += ["| link pattern | bytes/device | ms | GB/s per device |", "|---|---:|---:|---:|"]
    for name, r in link.items():
        lines.append(f"| {name} | {_size(r['bytes'])} | {r['median_s'] * 1e3:.3f} | {r['GBps']:.3g} |")
    lines += [
        "",
        "| model | A -> B | moved | max send / recv | msgs | ms | aggregate GB/s "
        "| bottleneck GB/s | of p2p | of all-pairs | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["pairs"]:
        frac = f"{r['link_fraction']:.0%}" if r["link_fraction"] is not None else "-"
        frac_ap = f"{r['all_pairs_fraction']:.0%}" if r["all_pairs_fraction"] is not None else "-"
        lines.append(
            f"| {r['role']} | {r['src']} -> {r['dst']} | {_size(r['moved_bytes'])} | "
            f"{_size(r['max_send_bytes'])} / {_size(r['max_recv_bytes'])} | {r['num_messages']} | "
            f"{r['median_s'] * 1e3:.3f} | {r['aggregate_GBps']:.3g} | {r['bottleneck_GBps']:.3g} | {frac} | "
            f"{frac_ap} | {'ok' if r['verified'] else 'FAIL'} |"
        )
    worst = min((r["link_fraction"] for r in res["pairs"] if r["link_fraction"] is not None), default=None)
    if worst is not None:
        verdict = "meets" if worst >= res["target"] else "misses"
        lines += ["", f"worst link fraction {worst:.0%}: {verdict} the {res['target']:.0%} target"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the lender's rule: NVLink multicast stays off
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        from reallm.kernels.intervals import intervals_cuda_available

        intervals_cuda_available()  # build the kernel before any collective can time out waiting for it
    else:
        torch.set_num_threads(1)
    comm.init(rank, world_size, backend, timeout_s=args.timeout_s)
    try:
        res = run(args, rank)
        if rank == 0:
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1, default=str)
            print(format_table(res), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
