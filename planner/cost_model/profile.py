"""Cost profiles: measured (or analytic) layer times and collective rates, as versioned JSON.

Schema (``"format": "reallm.profile"``, version 2)::

    {
      "format": "reallm.profile", "version": 2,
      "source": "analytic" | "measured",       # analytic: from datasheet rates (analytic_profile.py)
      "device": "NVIDIA H100 80GB HBM3",      # Cluster.gpu_name, or "cpu"
      "dtype": "bf16",                        # bf16 | fp32 (the CPU profile of the tiny models)
      "includes_tp_comm": false,              # true: layer times already contain their tp collectives
      "notes": "free text: how it was made",
      "rates": {...},                         # optional: the rates an analytic profile was made from
      "models": {
        "<shape key>": {                      # shape_key(spec), e.g. "h4096-i11008-q32-kv32-d128-v32000"
          "shape": {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32,
                    "num_kv_heads": 32, "head_dim": 128, "vocab_size": 32000, "qkv_bias": false},
          "layers": {
            "embedding":   {"<tp>": {"forward": TOK, "backward": TOK, "prefill": TOK}},
            "block":       {"<tp>": {"forward": TOK, "backward": TOK, "prefill": TOK,
                                     "decode": DEC, "decode_host": DEC, "decode_capture": DEC,
                                     "forward_ckpt": TOK, "backward_ckpt": TOK,    # optional
                                     "prefill_graphed": TOK,                       # optional
                                     "stream_decode": DEC, "stream_capture": DEC}},  # optional (below)
            "head":        {"<tp>": {... the same six ...}},   # final norm + LM head (+ log-softmax)
            "score_head":  {"<tp>": {"forward": TOK, "backward": TOK, "prefill": TOK, "decode": DEC}},
            "decode_step": {"<tp>": {"launch": DEC, "launch_host": DEC, "capture": DEC,
                                     "greedy": DEC, "greedy_host": DEC, "sample": DEC, "sample_host": DEC,
                                     "stream_launch": DEC, "stream_launch_host": DEC,   # optional (below)
                                     "stream_capture": DEC}}
          }
        }
      },
      "optimizer": {"time_s_per_param": 1.0e-11},            # Adam step, per parameter on one device
      "collectives": {                                       # alpha-beta per link type and group size
        "nvlink": {"2": {"bandwidth_bytes_per_s": 3.6e11, "latency_s": 1e-5}, "4": ..., "8": ...},
        "ib":     {"2": {...}, ..., "128": {...}},
        "host":   {"1": {...}}                               # pinned host <-> device copies
      },                                                     # an entry may say "assumed": true (below)
      "runs": [                                              # optional: how a measured profile was made
        {"command": "planner profile --model llama-7b ...", "date_utc": "2025-01-01T00:00:00+00:00",
         "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "git_commit": "...",
         "models": ["<shape key>", ...], "tp": [1, 2, 4, 8], "grids": {...}, "skipped": [...],
         "measured": ["<shape key> tp=1", ...], "...": "..."}     # measured: the entries this run wrote
      ]
    }

``TOK`` is the time of one call of the layer on one tp rank for a micro-batch of ``tokens`` tokens
packed in sequences of ``seqlen`` tokens: ``{"seqlen": [s..], "tokens": [t..], "time_s": [[..] per
seqlen]}`` (one seqlen row makes it a function of tokens alone). ``DEC`` is one decode step of
``batch`` sequences whose KV cache holds ``kv_len`` tokens: ``{"batch": [b..], "kv_len": [k..],
"time_s": [[..] per batch]}``. Both are piecewise linear (bilinear between grid points); beyond the
last grid point a table extrapolates along its last segment, below the first it holds the first value
(a kernel-launch floor). Layer times exclude the tp collectives unless ``includes_tp_comm`` and exclude
pipeline send/receive; ``forward`` and ``backward`` exclude the recomputation of gradient checkpointing
(``backward_ckpt`` includes it, below). Collective bandwidth is the per-device "bus bandwidth" of a ring (cost formulas in
``collectives.py``); a group size missing from the table uses the nearest smaller one's bandwidth and
scales latency with log2 of the size.

Gradient checkpointing (``Transformer._blocks`` runs each block under ``torch.utils.checkpoint``): a
block's ``forward_ckpt`` is its forward so wrapped, ``backward_ckpt`` its backward, which recomputes the
forward first. Both are optional; without them the cost model counts a checkpointed block as a forward
and, in backward, a forward + a backward.

Graphed inference (``reallm.model.graphs``: an inference replica on CUDA with tp = 1 replays its embedding
and blocks from a CUDA graph per token bucket): a block's ``prefill_graphed`` is the device time of
``prefill``'s work (no KV cache) replayed from a graph, at the padded token count. Optional; without it
the cost model takes ``prefill`` (the eager call). ``train_graphed`` / ``train_graphed_ckpt``: a block's
forward + backward (plain / under gradient checkpointing) replayed from a pair of graphs
(``TrainGraphs``), the gradient accumulation hooks included; optional (CUDA, tp = 1), used for train calls
with ``train_cuda_graphs``.

Decode steps, as generation runs them (``reallm.parallel.generate``: the host launches a step and the
sampling without waiting for the device, so host and device work overlap; ``call_time.py`` combines
them). For each layer: ``decode`` is its *device* time per step, ``decode_host`` the *host* time the
step loop spends on it (eager: the launches of its kernels; where the step is one replayed CUDA graph:
the graph launch's increment per layer, ≈ 0), ``decode_capture`` the one-off cost per generation call and
micro-batch of the eager warm-up step and the graph capture, per layer (0 where nothing is captured).
``head.decode`` is norm + LM head only. ``decode_step`` holds what is not a layer, per step of the last
stage: ``launch`` / ``launch_host`` the device / host time of the step outside its layers (inputs
copied into the graph, embedding, positions, the replay launch, the ring's bookkeeping), ``capture`` its
share of the one-off warm-up and capture, and the sampling of the next token from the logits (tp
gather, ``reallm.parallel.generate._sample``): device and host time, greedy (``greedy``, ``greedy_host``)
and sampling (``sample``, ``sample_host``: the measuring run's ``sampling`` settings, PPO's top-k/top-p
with the logits mask by default; optionally ``sample_plain``, ``sample_plain_host``: temperature only, no
top-k / top-p filter, as a call with ``top_k=0, top_p=1`` samples — without them such calls read
``sample``). ``decode_step`` tables have one ``kv_len`` column (the stream tables below excepted).

The one-launch stream step (``reallm.model.stream_decode``: on sm_90 at tp = pp = 1, micro-batches of at
most 64 sequences, shapes that fit) runs the whole model's step as one replayed kernel, so its time does
not split into the layers' library tables. Optional, measured where it runs: a block's ``stream_decode``
(its share of the step's device time) and ``stream_capture`` (of the one-off cost per generation call:
weights packed, cache permuted), both half the difference between steps of 3- and 1-block models; and in
``decode_step`` the rest — ``stream_launch`` (device: input preparation, final norm and LM head, launch),
``stream_launch_host`` and ``stream_capture`` (the runner made, the first step and the capture). Batches
past 64 are never read (generation takes the library step there); the capture tables are read at the
call's cache capacity. The cost model uses them only where all five are present. On a CPU the host
does the work: device tables hold the wall time and the host and capture tables are 0.

Version 1 (no ``decode_host``, ``decode_capture``, ``decode_step``; the head's decode included the
sampling, timed back to back) still loads: the missing tables are 0, which reproduces version 1's
estimates (a step is the sum of the layers' decode times).

A measured profile (``executor/profiler.py``, ``planner profile``) lists its runs (one per profiler
invocation; ``--merge`` appends) with the device, date, torch and CUDA versions, git commit, the exact
command, the grids, and the grid points it skipped (did not fit in memory) and filled by extrapolating
along the table's last measured segment. Collective entries it could not measure (one process, or a
group size / link type the run did not have) are copied from the analytic rates and marked
``"assumed": true``; the planner uses them the same way, reports can tell them apart.

Time is always seconds (``_s``), sizes bytes (``_bytes``). A model shape missing from a profile (or
a tp degree missing for it) falls back to an analytic entry made from the profile's ``rates`` (or the
cluster's datasheet rates), and the fallback is recorded in ``Profile.fallbacks``.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from reallm.errors import UserError
from reallm.spec import ModelSpec

PROFILE_FORMAT = "reallm.profile"
PROFILE_VERSION = 2
PROFILE_DIR = Path(__file__).resolve().parent.parent.parent / "profiles"

LAYER_KINDS = ("embedding", "block", "head", "score_head", "decode_step")
TOKEN_OPS = ("forward", "backward", "prefill")
#: A block under gradient checkpointing (optional, module docstring): its forward, and its backward, which
#: recomputes the forward.
CKPT_OPS = ("forward_ckpt", "backward_ckpt")
#: A layer's decode tables (module docstring): device time, host time, one-off warm-up and capture.
DECODE_OPS = ("decode", "decode_host", "decode_capture")
#: How the next token is drawn: ``greedy`` (argmax) or ``sample`` (the profile's sampling settings).
SAMPLING_MODES = ("greedy", "sample")
#: Optional: sampling from the temperature-scaled distribution with no top-k / top-p filter (no sort over
#: the vocabulary); profiles without it use ``sample`` for such calls.
PLAIN_SAMPLING_MODE = "sample_plain"
STEP_OPS = ("launch", "launch_host", "capture") + tuple(op for m in SAMPLING_MODES for op in (m, f"{m}_host"))
#: Ops each layer kind must provide; every op outside ``TOKEN_OPS`` is a decode table (batch × kv_len).
REQUIRED_OPS = {"embedding": TOKEN_OPS, "block": TOKEN_OPS + DECODE_OPS, "head": TOKEN_OPS + DECODE_OPS,
                "score_head": TOKEN_OPS + ("decode",), "decode_step": STEP_OPS}
#: Ops a kind may provide (the cost model falls back to others without them).
#: A block's no-grad forward replayed from a CUDA graph (optional, module docstring).
GRAPHED_OPS = ("prefill_graphed", "train_graphed", "train_graphed_ckpt")
#: The one-launch stream step (optional, module docstring): per block, and outside the blocks.
STREAM_BLOCK_OPS = ("stream_decode", "stream_capture")
STREAM_STEP_OPS = ("stream_launch", "stream_launch_host", "stream_capture")
OPTIONAL_OPS = {"block": CKPT_OPS + GRAPHED_OPS + STREAM_BLOCK_OPS,
                "decode_step": (PLAIN_SAMPLING_MODE, f"{PLAIN_SAMPLING_MODE}_host") + STREAM_STEP_OPS}
LINK_TYPES = ("nvlink", "ib", "host")


def shape_key(spec: ModelSpec) -> str:
    """The profile key of a model's layer shapes (the number of layers does not change a layer)."""
    key = (f"h{spec.hidden_size}-i{spec.intermediate_size}-q{spec.num_heads}-kv{spec.num_kv_heads}"
           f"-d{spec.head_dim}-v{spec.vocab_size}")
    return key + ("-bias" if spec.qkv_bias else "")


def shape_of(spec: ModelSpec) -> dict:
    return {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "vocab_size": spec.vocab_size, "qkv_bias": spec.qkv_bias}


# -- piecewise-linear tables -----------------------------------------------------------------------
def _interp_axis(xs: list[float], x: float) -> tuple[int, float]:
    """Segment index i and weight w so that value = (1-w)·v[i] + w·v[i+1]. Below the grid: hold the first
    value (w=0 on segment 0); above: extrapolate along the last segment (w > 1); one point: constant."""
    n = len(xs)
    if n == 1:
        return 0, 0.0
    if x <= xs[0]:
        return 0, 0.0
    i = min(bisect.bisect_right(xs, x) - 1, n - 2)
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class Table2D:
    """``time_s[i][j]`` at ``(x[i], y[j])``, bilinear in between (see the module docstring)."""

    x_name: str
    y_name: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    time_s: tuple[tuple[float, ...], ...]

    def __call__(self, x: float, y: float) -> float:
        i, wx = _interp_axis(self.x, x)
        j, wy = _interp_axis(self.y, y)
        t = self.time_s

        def row(r: int) -> float:
            if len(self.y) == 1:
                return t[r][0]
            return (1 - wy) * t[r][j] + wy * t[r][j + 1]

        v = row(i) if len(self.x) == 1 else (1 - wx) * row(i) + wx * row(i + 1)
        return max(v, 0.0)

    def to_dict(self) -> dict:
        return {self.x_name: list(self.x), self.y_name: list(self.y), "time_s": [list(r) for r in self.time_s]}

    @classmethod
    def from_dict(cls, d: Any, x_name: str, y_name: str, where: str, problems: list[str]) -> Optional[Table2D]:
        if not isinstance(d, dict):
            problems.append(f"{where}: expected an object with {x_name}, {y_name}, time_s")
            return None
        missing = [k for k in (x_name, y_name, "time_s") if k not in d]
        unknown = sorted(set(d) - {x_name, y_name, "time_s"})
        if missing or unknown:
            problems.append(f"{where}: " + "; ".join(([f"missing {missing}"] if missing else [])
                                                     + ([f"unknown {unknown}"] if unknown else [])))
            return None
        xs, ys, ts = d[x_name], d[y_name], d["time_s"]
        ok = True
        for name, axis in ((x_name, xs), (y_name, ys)):
            if (not isinstance(axis, list) or not axis or not all(isinstance(v, (int, float)) for v in axis)
                    or any(v < 0 for v in axis) or any(a >= b for a, b in zip(axis, axis[1:]))):
                problems.append(f"{where}.{name}: must be a non-empty, strictly increasing list of numbers ≥ 0")
                ok = False
        if ok and (not isinstance(ts, list) or len(ts) != len(xs)
                   or any(not isinstance(r, list) or len(r) != len(ys) for r in ts)):
            problems.append(f"{where}.time_s: must be {len(xs)} rows ({x_name}) of {len(ys)} values ({y_name})")
            ok = False
        if ok and any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for r in ts for v in r):
            problems.append(f"{where}.time_s: every time must be a finite number ≥ 0 (seconds)")
            ok = False
        if not ok:
            return None
        return cls(x_name, y_name, tuple(map(float, xs)), tuple(map(float, ys)),
                   tuple(tuple(map(float, r)) for r in ts))


def token_table(d: Any, where: str, problems: list[str]) -> Optional[Table2D]:
    return Table2D.from_dict(d, "seqlen", "tokens", where, problems)


def decode_table(d: Any, where: str, problems: list[str]) -> Optional[Table2D]:
    return Table2D.from_dict(d, "batch", "kv_len", where, problems)


def table_of(op: str, d: Any, where: str, problems: list[str]) -> Optional[Table2D]:
    """``op``'s table: token ops are ``seqlen × tokens``, every other op ``batch × kv_len``."""
    return (token_table if op in TOKEN_OPS + CKPT_OPS + GRAPHED_OPS else decode_table)(d, where, problems)


@dataclass(frozen=True)
class Grids:
    """Grid axes of a profile's tables: token ops ``seqlens × tokens``, decode ``batches × kv_lens``. The
    profiler measures on them (``executor.profiler``); ``Grids.of`` reads them back from a profile."""

    tokens: tuple[int, ...]
    seqlens: tuple[int, ...]
    batches: tuple[int, ...]
    kv_lens: tuple[int, ...]

    def __post_init__(self):
        for name in ("tokens", "seqlens", "batches", "kv_lens"):
            raw = tuple(getattr(self, name))
            axis = tuple(int(v) for v in raw)
            if (not axis or axis != raw or any(v < 1 for v in axis)
                    or any(a >= b for a, b in zip(axis, axis[1:]))):
                raise UserError(f"profile grid {name}: must be a non-empty, strictly increasing list of positive "
                                f"integers, got {list(raw)}")
            object.__setattr__(self, name, axis)

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("tokens", "seqlens", "batches", "kv_lens")}

    @staticmethod
    def of(profile: Profile, spec: ModelSpec, tp: int = 1) -> Grids:
        """The axes of ``spec``'s block tables at ``tp`` (an analytic entry is made first if missing)."""
        block = profile._entry(spec, "block", tp)
        fwd, dec = block["forward"], block["decode"]
        return Grids(tokens=fwd.y, seqlens=fwd.x, batches=dec.x, kv_lens=dec.y)


@dataclass(frozen=True)
class LinkRate:
    bandwidth_bytes_per_s: float
    latency_s: float
    #: Copied from datasheet / analytic rates rather than measured (a measured profile on one process).
    assumed: bool = False


# -- the profile -----------------------------------------------------------------------------------
@dataclass
class Profile:
    """A loaded, validated profile. ``layers[shape][kind][tp][op]`` is a ``Table2D``."""

    source: str
    device: str
    dtype: str
    includes_tp_comm: bool
    layers: dict[str, dict[str, dict[int, dict[str, Table2D]]]]
    optimizer_time_s_per_param: float
    collectives: dict[str, dict[int, LinkRate]]
    notes: str = ""
    rates: Optional[dict] = None
    shapes: dict[str, dict] = field(default_factory=dict)
    #: Model shapes / tp degrees that were missing and got an analytic entry (for reports).
    fallbacks: list[str] = field(default_factory=list)
    path: Optional[str] = None
    #: How a measured profile was made: one metadata object per profiler run (module docstring).
    runs: list[dict] = field(default_factory=list)

    # -- lookups ------------------------------------------------------------------------------------
    def _entry(self, spec: ModelSpec, kind: str, tp: int) -> dict[str, Table2D]:
        key = shape_key(spec)
        per_tp = self.layers.get(key, {}).get(kind, {})
        if tp not in per_tp:
            self._fill_analytic(spec, tp)
            per_tp = self.layers[key][kind]
        return per_tp[tp]

    def _fill_analytic(self, spec: ModelSpec, tp: int) -> None:
        from planner.cost_model.analytic_profile import AnalyticRates, analytic_layers

        rates = AnalyticRates.from_dict(self.rates) if self.rates else AnalyticRates.h100()
        key = shape_key(spec)
        entry = analytic_layers(spec, rates, tps=(tp,))
        mine = self.layers.setdefault(key, {})
        for kind, per_tp in entry.items():
            for t, ops in per_tp.items():
                mine.setdefault(kind, {}).setdefault(t, ops)
        self.shapes.setdefault(key, shape_of(spec))
        self.fallbacks.append(f"{key} tp={tp}: analytic ({rates.name})")

    def layer_time_s(self, spec: ModelSpec, kind: str, op: str, tp: int, tokens: float, seqlen: float) -> float:
        """One call of ``op`` (forward/backward/prefill, or a ``CKPT_OPS`` / ``GRAPHED_OPS`` op) of one layer on
        one tp rank."""
        return self._entry(spec, kind, tp)[op](seqlen, tokens)

    def has_op(self, spec: ModelSpec, kind: str, op: str, tp: int) -> bool:
        """Whether the entry of ``spec``'s ``kind`` at ``tp`` has the (optional) table ``op``."""
        return op in self._entry(spec, kind, tp)

    def decode_time_s(self, spec: ModelSpec, kind: str, tp: int, batch: float, kv_len: float,
                      op: str = "decode") -> float:
        """Decode table ``op`` of ``kind`` (module docstring; default: the layer's device time per step) on one
        tp rank for ``batch`` sequences with ``kv_len`` cached tokens."""
        return self._entry(spec, kind, tp)[op](batch, kv_len)

    def link(self, link_type: str, group_size: int) -> LinkRate:
        """Alpha-beta rates of ``link_type`` for a group of ``group_size`` devices (module docstring)."""
        table = self.collectives[link_type]
        if group_size in table:
            return table[group_size]
        sizes = sorted(table)
        below = [s for s in sizes if s <= group_size]
        base = below[-1] if below else sizes[0]
        r = table[base]
        scale = (1 + math.log2(max(group_size, 2))) / (1 + math.log2(max(base, 2)))
        return LinkRate(r.bandwidth_bytes_per_s, r.latency_s * scale, r.assumed)

    # -- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        models = {}
        for key, kinds in self.layers.items():
            models[key] = {"shape": self.shapes.get(key, {}),
                           "layers": {k: {str(tp): {op: t.to_dict() for op, t in ops.items()}
                                          for tp, ops in sorted(per_tp.items())} for k, per_tp in kinds.items()}}
        d = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "source": self.source, "device": self.device,
             "dtype": self.dtype, "includes_tp_comm": self.includes_tp_comm, "notes": self.notes}
        if self.rates is not None:
            d["rates"] = self.rates
        d["models"] = models
        d["optimizer"] = {"time_s_per_param": self.optimizer_time_s_per_param}
        d["collectives"] = {lt: {str(n): _link_dict(r) for n, r in sorted(tab.items())}
                            for lt, tab in self.collectives.items()}
        if self.runs:
            d["runs"] = self.runs
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _link_dict(r: LinkRate) -> dict:
    d: dict = {"bandwidth_bytes_per_s": r.bandwidth_bytes_per_s, "latency_s": r.latency_s}
    if r.assumed:
        d["assumed"] = True
    return d


#: Fields every entry of ``runs`` must have (strings); others are free-form metadata.
RUN_REQUIRED = ("command", "date_utc", "device", "torch")


def _check_runs(runs: Any, problems: list[str]) -> list[dict]:
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        problems.append("runs must be a list of objects (one per profiler run)")
        return []
    for i, r in enumerate(runs):
        missing = [k for k in RUN_REQUIRED if not isinstance(r.get(k), str)]
        if missing:
            problems.append(f"runs[{i}]: missing or non-string field(s) {missing}")
    return runs


def _zero_like(td: Any, one_column: bool = False) -> Any:
    """A decode table of zeros on ``td``'s axes (``td`` itself when it is not a well-formed table dict)."""
    if not isinstance(td, dict) or not isinstance(td.get("batch"), list) or not isinstance(td.get("kv_len"), list):
        return td
    kv = td["kv_len"][:1] if one_column else td["kv_len"]
    return {"batch": list(td["batch"]), "kv_len": list(kv), "time_s": [[0.0] * len(kv) for _ in td["batch"]]}


def upgrade_v1(d: dict) -> dict:
    """A version-1 profile dict as version 2 (module docstring): the new decode tables are zeros, so a step
    costs the sum of the layers' decode times as in version 1. Malformed parts are left for validation."""
    out = copy.deepcopy(d)
    out["version"] = 2
    models = out.get("models")
    for m in (models.values() if isinstance(models, dict) else ()):
        kinds = m.get("layers") if isinstance(m, dict) else None
        if not isinstance(kinds, dict):
            continue
        for kind in ("block", "head"):
            per_tp = kinds.get(kind)
            for ops in (per_tp.values() if isinstance(per_tp, dict) else ()):
                if isinstance(ops, dict) and "decode" in ops:
                    for op in ("decode_host", "decode_capture"):
                        ops.setdefault(op, _zero_like(ops["decode"]))
        heads = kinds.get("head")
        if isinstance(heads, dict) and "decode_step" not in kinds:
            steps = {tp: {op: _zero_like(ops["decode"], one_column=True) for op in STEP_OPS}
                     for tp, ops in heads.items() if isinstance(ops, dict) and isinstance(ops.get("decode"), dict)}
            if steps:
                kinds["decode_step"] = steps
    note = "Version 1 file read as version 2: host, capture and decode-step tables are 0 (a step is the sum of "
    note += "the layers' decode times; the head's decode includes the sampling)."
    out["notes"] = (str(out.get("notes", "")) + " " + note).strip()
    return out


def profile_from_dict(d: Any, where: str = "profile") -> Profile:
    """Validate and load; raises ``UserError`` listing every problem at once. Version 1 is upgraded
    (``upgrade_v1``)."""
    if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
        raise UserError(f"{where}: not a reallm profile (expected \"format\": \"{PROFILE_FORMAT}\")")
    v = d.get("version")
    if not isinstance(v, int) or v < 1:
        raise UserError(f"{where}: version must be a positive integer, got {v!r}")
    if v > PROFILE_VERSION:
        raise UserError(f"{where}: version {v} is newer than this reallm understands (≤ {PROFILE_VERSION})")
    if v == 1:
        d = upgrade_v1(d)
    problems: list[str] = []
    known = {"format", "version", "source", "device", "dtype", "includes_tp_comm", "notes", "rates", "models",
             "optimizer", "collectives", "runs"}
    unknown = sorted(set(d) - known)
    if unknown:
        problems.append(f"unknown top-level field(s) {unknown}")
    for k in ("source", "device", "dtype", "models", "optimizer", "collectives"):
        if k not in d:
            problems.append(f"missing top-level field {k!r}")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    if d["source"] not in ("analytic", "measured"):
        problems.append(f"source must be 'analytic' or 'measured', got {d['source']!r}")
    if d["dtype"] not in ("bf16", "fp16", "fp32"):
        problems.append(f"dtype must be bf16, fp16 or fp32, got {d['dtype']!r}")

    layers: dict = {}
    shapes: dict = {}
    models = d["models"]
    if not isinstance(models, dict):
        problems.append("models must be an object keyed by shape key")
        models = {}
    for key, m in models.items():
        w = f"models.{key}"
        if not isinstance(m, dict) or "layers" not in m:
            problems.append(f"{w}: expected {{\"shape\": ..., \"layers\": ...}}")
            continue
        shapes[key] = m.get("shape", {})
        kinds = m["layers"]
        if not isinstance(kinds, dict):
            problems.append(f"{w}.layers: expected an object keyed by layer kind")
            continue
        for kind, per_tp in kinds.items():
            if kind not in LAYER_KINDS:
                problems.append(f"{w}.layers.{kind}: unknown layer kind (known: {', '.join(LAYER_KINDS)})")
                continue
            if not isinstance(per_tp, dict) or not per_tp:
                problems.append(f"{w}.layers.{kind}: expected an object keyed by tp degree")
                continue
            for tp_s, ops in per_tp.items():
                wt = f"{w}.layers.{kind}.{tp_s}"
                if not str(tp_s).isdigit() or int(tp_s) < 1:
                    problems.append(f"{wt}: tp degree keys must be positive integers")
                    continue
                if not isinstance(ops, dict):
                    problems.append(f"{wt}: expected an object keyed by op")
                    continue
                missing = [op for op in REQUIRED_OPS[kind] if op not in ops]
                extra = sorted(set(ops) - set(REQUIRED_OPS[kind]) - set(OPTIONAL_OPS.get(kind, ())))
                if missing or extra:
                    problems.append(f"{wt}: " + "; ".join(([f"missing op(s) {missing}"] if missing else [])
                                                          + ([f"unknown op(s) {extra}"] if extra else [])))
                out = {}
                for op, td in ops.items():
                    if op not in REQUIRED_OPS[kind] and op not in OPTIONAL_OPS.get(kind, ()):
                        continue
                    t = table_of(op, td, f"{wt}.{op}", problems)
                    if t is not None:
                        out[op] = t
                layers.setdefault(key, {}).setdefault(kind, {})[int(tp_s)] = out

    opt = d["optimizer"]
    opt_t = opt.get("time_s_per_param") if isinstance(opt, dict) else None
    if not isinstance(opt_t, (int, float)) or not math.isfinite(opt_t) or opt_t < 0:
        problems.append(f"optimizer.time_s_per_param must be a number ≥ 0, got {opt_t!r}")
        opt_t = 0.0

    colls: dict[str, dict[int, LinkRate]] = {}
    cd = d["collectives"]
    if not isinstance(cd, dict):
        problems.append("collectives must be an object keyed by link type")
        cd = {}
    for lt in ("nvlink", "ib"):
        if lt not in cd:
            problems.append(f"collectives.{lt}: missing (every profile needs nvlink and ib rates)")
    for lt, tab in cd.items():
        if lt not in LINK_TYPES:
            problems.append(f"collectives.{lt}: unknown link type (known: {', '.join(LINK_TYPES)})")
            continue
        if not isinstance(tab, dict) or not tab:
            problems.append(f"collectives.{lt}: expected an object keyed by group size")
            continue
        for n_s, r in tab.items():
            wl = f"collectives.{lt}.{n_s}"
            if not str(n_s).isdigit() or int(n_s) < 1:
                problems.append(f"{wl}: group size keys must be positive integers")
                continue
            bw = r.get("bandwidth_bytes_per_s") if isinstance(r, dict) else None
            lat = r.get("latency_s") if isinstance(r, dict) else None
            if not isinstance(bw, (int, float)) or bw <= 0 or not isinstance(lat, (int, float)) or lat < 0:
                problems.append(f"{wl}: needs bandwidth_bytes_per_s > 0 and latency_s ≥ 0")
                continue
            assumed = r.get("assumed", False)
            if not isinstance(assumed, bool):
                problems.append(f"{wl}: assumed must be true or false, got {assumed!r}")
                continue
            extra = sorted(set(r) - {"bandwidth_bytes_per_s", "latency_s", "assumed"})
            if extra:
                problems.append(f"{wl}: unknown field(s) {extra}")
                continue
            colls.setdefault(lt, {})[int(n_s)] = LinkRate(float(bw), float(lat), assumed)
    runs = _check_runs(d["runs"], problems) if "runs" in d else []
    if problems:
        raise UserError(f"{where} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return Profile(source=d["source"], device=d["device"], dtype=d["dtype"],
                   includes_tp_comm=bool(d.get("includes_tp_comm", False)), layers=layers,
                   optimizer_time_s_per_param=float(opt_t), collectives=colls, notes=d.get("notes", ""),
                   rates=d.get("rates"), shapes=shapes, runs=runs)


def load_profile(path: str) -> Profile:
    p = Path(path)
    if not p.exists() and not p.suffix:
        p = PROFILE_DIR / f"{path}.json"
    try:
        text = p.read_text()
    except OSError as e:
        known = sorted(q.stem for q in PROFILE_DIR.glob("*.json"))
        raise UserError(f"{path}: cannot read profile ({e.strerror}); shipped profiles: {', '.join(known)}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: line {e.lineno}: malformed JSON ({e.msg})") from None
    prof = profile_from_dict(d, where=str(p))
    prof.path = str(p)
    return prof


def default_profile(cluster) -> Profile:
    """The shipped profile for a cluster: ``profiles/<cluster.name>_measured.json`` if present (made by
    ``planner profile`` on that device), else ``<name>_analytic.json``, else an analytic profile made now
    from the cluster's datasheet rates. A file measured on another device is passed over, with a warning."""
    import warnings

    from planner.cost_model.analytic_profile import AnalyticRates, empty_analytic_profile

    for suffix in ("measured", "analytic"):
        p = PROFILE_DIR / f"{cluster.name}_{suffix}.json"
        if p.exists():
            prof = load_profile(str(p))
            if prof.device == cluster.gpu_name or cluster.device_kind == "cpu" and prof.device == "cpu":
                return prof
            warnings.warn(f"{p} was made on {prof.device!r}, not this cluster's {cluster.gpu_name!r}; not used",
                          stacklevel=2)
    return empty_analytic_profile(AnalyticRates.from_cluster(cluster), cluster.gpu_name,
                                  "fp32" if cluster.device_kind == "cpu" else "bf16")
