"""Generation: packed prefill, then one-token decode steps against a preallocated KV cache.

Sampling at generated position t (0-based), for each sequence, from the last logits z (fp32)::

    1. EOS ban:     z[eos] = -inf                 while t < min_new_tokens
    2. temperature: z = z / temperature            (sampling only)
    3. top-k:       keep exactly the k = min(top_k, V) largest (ties broken by index); others -inf
    4. top-p:       sort the remaining tokens by probability p (descending); keep token i iff the mass of
                    the tokens before it is < top_p: the *minimal* nucleus whose mass reaches top_p
    5. draw:        greedy: argmax z; sampling: inverse CDF, token = min{i : cumsum(softmax z)_i > u}
                    with u ~ U[0, 1) from a counter-based hash of (seed, step, sequence id, t)

Log-probabilities: ``logprob = log_softmax(z_processed)[token]``: the distribution the token was drawn
from, after the EOS ban, temperature and top-k/top-p renormalisation (ReaL's ``genstep`` convention;
greedy applies only the EOS ban). The logits mask, when asked for, is True where z_processed = -inf,
i.e. tokens outside the sampling support (top-k/top-p filtered, and EOS while banned), so training can
recompute log-probs over the same support.

On CUDA, where no top-k / top-p filter applies and no mask is asked for, steps 1, 2 and 5 and the
log-probability run as one Triton program per row (``reallm/kernels/sample.py``; the same draw, its sums
in another order). Randomness depends only on (seed, step, sequence id, t) (``keyed_uniforms``, splitmix64 in numpy), not on
the batch a sequence lands in, its dp rank, or the device. A sequence that emitted EOS is finished:
later positions are ``pad_token_id`` with log-prob 0 and are not part of its output; decode stops when
every sequence is finished (checked every ``POLL_EVERY`` steps) or after ``max_new_tokens``. ``no_eos`` marks sequences cut by the limit.

Static shapes: the cache is ``[B, nkv, max_prompt_len + max_new_tokens, D]`` per block and every decode
step runs all B rows, so on CUDA the step can be captured once as a graph and replayed
(``use_cuda_graph``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from reallm import working_set
from reallm.errors import UserError
from reallm.kernels import sample
from reallm.model.transformer import KVCache, Transformer, pack_sequences
from reallm.working_set import sampling_chunk_logits, sampling_chunk_rows


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings (ReaL's field names; ``return_logits_mask`` = not ``force_no_logits_mask``)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    greedy: bool = False
    temperature: float = 1.0
    #: Keep the k most likely tokens; <= 0 disables; clamped to the vocabulary.
    top_k: int = 0
    #: Keep the minimal nucleus of mass >= top_p; 1.0 disables.
    top_p: float = 1.0
    return_logits_mask: bool = False
    #: Bound generation's working set (``reallm.working_set``: small prefill groups, sampling in row chunks)
    #: at the cost of more kernel launches; the lean memory policy sets it.
    lean_memory: bool = False

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                            f"got {self.min_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise UserError("generation config: " + "; ".join(problems))

    @staticmethod
    def from_config(obj: Any) -> GenerationConfig:
        """From any object with ReaL's generation fields (e.g. the PPO hyperparameters)."""
        return GenerationConfig(
            max_new_tokens=int(obj.max_new_tokens), min_new_tokens=int(obj.min_new_tokens), greedy=bool(obj.greedy),
            temperature=float(obj.temperature), top_k=int(obj.top_k), top_p=float(obj.top_p),
            return_logits_mask=not bool(getattr(obj, "force_no_logits_mask", True)))


# -- randomness keyed by (seed, step, sequence id, position) ----------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_uniforms(seed: int, step: int, seq_ids: Sequence[int], num_positions: int) -> np.ndarray:
    """U[0, 1) float64 ``[B, num_positions]``; entry (b, t) depends only on (seed, step, seq_ids[b], t)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
        h = _splitmix64(h + np.uint64(step % 2**64) * _GOLDEN)
        ids = np.array([i % 2**64 for i in seq_ids], dtype=np.uint64)
        h = _splitmix64(h + ids * _GOLDEN)  # [B]
        t = np.arange(num_positions, dtype=np.uint64)
        u = _splitmix64(h[:, None] + (t[None, :] + np.uint64(1)) * _GOLDEN)
    return (u >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


# -- one sampling step ------------------------------------------------------------------------------------


def apply_top_k_top_p(z_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside top-k, then outside the minimal top-p nucleus (in place, returned)."""
    V = z_BV.shape[-1]
    if 0 < top_k < V:
        idx = z_BV.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(z_BV, dtype=torch.bool).scatter_(-1, idx, True)
        z_BV.masked_fill_(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z_BV.sort(dim=-1, descending=True)
        p = sorted_z.softmax(-1)
        mass_before = p.cumsum(-1) - p
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False  # the most likely token always stays
        remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
        z_BV.masked_fill_(remove, float("-inf"))
    return z_BV


def process_logits(logits_BV: torch.Tensor, cfg: GenerationConfig, t: int, eos_token_ids: Sequence[int],
                   vocab_size: Optional[int] = None) -> torch.Tensor:
    """The logits the token is drawn from (steps 1-4 of the module docstring), fp32, removed = -inf."""
    z = logits_BV.to(torch.float32, copy=True)  # one kernel for bf16 (float() then clone() was two)
    if vocab_size is not None and z.shape[-1] > vocab_size:
        z[:, vocab_size:] = float("-inf")  # tp vocabulary padding is never a real token
    if t < cfg.min_new_tokens and eos_token_ids:
        z[:, list(eos_token_ids)] = float("-inf")
    if not cfg.greedy:
        if cfg.temperature != 1.0:
            z = z / cfg.temperature
        z = apply_top_k_top_p(z, min(cfg.top_k, vocab_size or z.shape[-1]), cfg.top_p)
    return z


def draw(z_BV: torch.Tensor, u_B: Optional[torch.Tensor]) -> torch.Tensor:
    """Greedy argmax (``u_B`` None) or the inverse-CDF draw of softmax(z) at uniforms ``u_B``."""
    if u_B is None:
        return z_BV.argmax(-1)
    # float64 cumsum: the tail of a large vocabulary must not vanish in rounding.
    cdf = torch.softmax(z_BV.double(), -1).cumsum(-1)
    x = (u_B.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    # First index whose cdf exceeds x: never a zero-probability token, since its cdf equals its predecessor's.
    tok = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return tok.clamp_(max=z_BV.shape[-1] - 1)


def sampling_step(logits_BV: torch.Tensor, cfg: GenerationConfig, t: int, eos_token_ids: Sequence[int],
                  u_B: Optional[torch.Tensor], vocab_size: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(token [B], its log-prob under the processed distribution [B], removed-token mask [B, V] or None).
    Rows are independent; they are processed in chunks of ``sampling_chunk_rows`` (bounded memory)."""
    B = logits_BV.shape[0]
    V = logits_BV.shape[-1] if vocab_size is None else min(vocab_size, logits_BV.shape[-1])
    ban = list(eos_token_ids) if t < cfg.min_new_tokens else []
    if (sample.usable(logits_BV) and not cfg.return_logits_mask and len(ban) <= 8
            and (cfg.greedy or (u_B is not None and not 0 < cfg.top_k < V and cfg.top_p >= 1.0))):
        # no filter over the vocabulary: the one-program-per-row kernels (reallm/kernels/sample.py)
        if cfg.greedy:
            tok, lp = sample.greedy(logits_BV[:, :V], ban)
        else:
            tok, lp = sample.plain(logits_BV, u_B, cfg.temperature, V, ban)
        return tok, lp, None
    rows = sampling_chunk_rows(logits_BV.shape[-1], sampling_chunk_logits(cfg.lean_memory), B)
    toks, logps, masks = [], [], []
    for a in range(0, max(B, 1), rows):
        z = process_logits(logits_BV[a:a + rows], cfg, t, eos_token_ids, vocab_size)
        tok = draw(z, None if cfg.greedy or u_B is None else u_B[a:a + rows])
        logps.append(torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1))
        toks.append(tok)
        if cfg.return_logits_mask:
            masks.append(torch.isneginf(z))
    if len(toks) == 1:
        return toks[0], logps[0], masks[0] if masks else None
    return torch.cat(toks), torch.cat(logps), torch.cat(masks) if masks else None


# -- outputs ----------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    """Per sequence b: ``tokens_BN[b, :lengths_B[b]]`` generated (EOS included when emitted)."""

    #: int64 [B, N], N = decode steps run (<= max_new_tokens); pad_token_id past each sequence's end.
    tokens_BN: torch.Tensor
    #: fp32 [B, N] log-prob of each generated token (module docstring); 0 past the end.
    logprobs_BN: torch.Tensor
    lengths_B: torch.Tensor
    #: True where the sequence hit max_new_tokens without emitting EOS.
    no_eos_B: torch.Tensor
    #: bool [B, N, V], True = token outside the sampling support at that position; None unless asked.
    logits_mask_BNV: Optional[torch.Tensor] = None

    @property
    def num_seqs(self) -> int:
        return self.tokens_BN.shape[0]

    def sequences(self) -> list[list[int]]:
        return [self.tokens_BN[b, :n].tolist() for b, n in enumerate(self.lengths_B.tolist())]

    def logprobs(self) -> list[torch.Tensor]:
        return [self.logprobs_BN[b, :n] for b, n in enumerate(self.lengths_B.tolist())]

    def logits_masks(self) -> Optional[list[torch.Tensor]]:
        if self.logits_mask_BNV is None:
            return None
        return [self.logits_mask_BNV[b, :n] for b, n in enumerate(self.lengths_B.tolist())]

    def packed(self) -> dict[str, torch.Tensor]:
        """Generated tokens only, packed: tokens and logprobs [T_gen], cu_seqlens [B+1], no_eos [B],
        logits_mask [T_gen, V] (when recorded)."""
        keep = torch.arange(self.tokens_BN.shape[1], device=self.tokens_BN.device)[None, :] < self.lengths_B[:, None]
        cu = torch.zeros(self.num_seqs + 1, dtype=torch.int32, device=self.tokens_BN.device)
        cu[1:] = self.lengths_B.cumsum(0)
        out = {"tokens": self.tokens_BN[keep], "logprobs": self.logprobs_BN[keep], "cu_seqlens": cu,
               "no_eos": self.no_eos_B}
        if self.logits_mask_BNV is not None:
            out["logits_mask"] = self.logits_mask_BNV[keep]
        return out

    def with_prompts(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Prompt + generation packed, in the training convention (row t is about token t+1).

        tokens [T], cu_seqlens [B+1], prompt_mask [T] (True on prompt tokens), logprobs [T] (row t: the
        generation log-prob of token t+1 if generated, else 0), logits_mask [T, V] (row t: the support
        token t+1 was drawn from; all False where token t+1 is not generated), no_eos [B].
        """
        gen = self.sequences()
        seqs = [list(p) + g for p, g in zip(prompts, gen, strict=True)]
        tokens, cu = pack_sequences(seqs, device=self.tokens_BN.device)
        T = tokens.shape[0]
        prompt_mask = torch.zeros(T, dtype=torch.bool, device=tokens.device)
        logprobs = torch.zeros(T, dtype=self.logprobs_BN.dtype, device=tokens.device)
        mask = None
        if self.logits_mask_BNV is not None:
            mask = torch.zeros((T, self.logits_mask_BNV.shape[-1]), dtype=torch.bool, device=tokens.device)
        bounds = cu.tolist()
        for b, (p, g) in enumerate(zip(prompts, gen, strict=True)):
            s, n = bounds[b], len(g)
            prompt_mask[s:s + len(p)] = True
            # Token at s + len(p) + j (generated j) is predicted at row s + len(p) + j - 1.
            rows = slice(s + len(p) - 1, s + len(p) - 1 + n)
            logprobs[rows] = self.logprobs_BN[b, :n]
            if mask is not None:
                mask[rows] = self.logits_mask_BNV[b, :n]
        out = {"tokens": tokens, "cu_seqlens": cu, "prompt_mask": prompt_mask, "logprobs": logprobs,
               "no_eos": self.no_eos_B}
        if mask is not None:
            out["logits_mask"] = mask
        return out


# -- the loop ---------------------------------------------------------------------------------------------


class DecodeRunner:
    """Calls ``model.decode``; on CUDA with ``use_graph``, captures it once and replays it."""

    #: The BLAS library the captured step's products come from (the choice is baked into the graph):
    #: cuBLASLt's kernels for the skinny products of a decode step replay faster on an H100 (1.48 vs
    #: 1.52 ms per step of the 1.1B model at batch 64, BENCHMARKS.md); None: torch's preference.
    BLAS: Optional[str] = "cublaslt"

    def __init__(self, model: Transformer, cache: KVCache, use_graph: bool):
        self.model, self.cache = model, cache
        self.use_graph = use_graph
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0

    def after_prefill(self) -> None:
        """A prefill wrote the cache (nothing to do: the library step reads the layout prefill writes)."""

    def __call__(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.use_graph:
            return self.model.decode(tokens_B, positions_B, self.cache)
        stream = _capture_stream(tokens_B.device)
        if self.calls == 1:
            # Warm-up on the capture stream (lazy library init, e.g. a cuBLAS workspace for that stream, must
            # not happen during capture); a real step.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), _blas(self.BLAS):
                out = self.model.decode(tokens_B, positions_B, self.cache)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.static_tokens = tokens_B.clone()
            self.static_positions = positions_B.clone()
            graph = torch.cuda.CUDAGraph()
            with _blas(self.BLAS), torch.cuda.graph(graph, stream=stream):
                self.static_out = self.model.decode(self.static_tokens, self.static_positions, self.cache)
            self.graph = graph  # only a completed capture is replayed
        self.static_tokens.copy_(tokens_B)
        self.static_positions.copy_(positions_B)
        self.graph.replay()
        return self.static_out


def stream_decode_usable(model: Transformer, batch: int, device) -> bool:
    """Whether decode steps of ``model`` for ``batch`` sequences run as the one-launch stream kernel
    (``reallm.model.stream_decode``; its caches need whole slots of 128 positions:
    ``working_set.stream_cache_len``)."""
    from reallm.model import stream_decode

    return stream_decode.unusable_logged(model, batch, device) is None


def decode_runner(model: Transformer, cache: KVCache, use_graph: bool):
    """The decode step for ``cache``'s sequences: the stream kernel's runner where it can run them (a CUDA
    sm_90 GPU, a LLaMA-shaped bf16 actor, ≤ 64 sequences, a cache of whole 128-position slots), else the
    library step's. Call its ``after_prefill`` after every prefill into ``cache``."""
    from reallm.model import stream_decode

    device = next(model.parameters()).device
    if cache.max_len == working_set.stream_cache_len(cache.max_len) and stream_decode_usable(model, cache.batch_size,
                                                                                             device):
        return stream_decode.StreamDecodeRunner(model, cache, use_graph)
    return DecodeRunner(model, cache, use_graph)


@contextlib.contextmanager
def _blas(library: Optional[str]):
    """torch's preferred BLAS library set to ``library`` inside the block (None: left alone)."""
    if library is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(library)
    except RuntimeError:  # a build without that library: keep torch's choice
        yield
        return
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


#: Decode steps between checks of "has every sequence finished": each check waits for the GPU, so
#: checking every step would stall the host's launches behind every step.
POLL_EVERY = 8


def should_poll(t: int, eos: Sequence[int]) -> bool:
    """Whether step ``t`` checks for the end of the batch: never without an EOS token, else every
    ``POLL_EVERY`` steps (finished sequences only emit padding meanwhile)."""
    return bool(eos) and t % POLL_EVERY == POLL_EVERY - 1


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every decode warm-up and capture (a new stream per graph would cost
    each its own library workspaces)."""
    key = torch.device(device).index
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[key]


def _eos_list(eos_token_id: Union[int, Sequence[int], None]) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.no_grad()
def checked_seq_ids(prompts: Sequence[Sequence[int]], seq_ids: Optional[Sequence[int]]) -> list[int]:
    """The prompts' global ids (default 0..B-1), after checking there are prompts and none is empty."""
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    seq_ids = list(range(B)) if seq_ids is None else list(seq_ids)
    if len(seq_ids) != B:
        raise ValueError(f"{len(seq_ids)} seq_ids for {B} prompts")
    return seq_ids


def generate(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *,
             eos_token_id: Union[int, Sequence[int], None], pad_token_id: int, seed: int = 0, step: int = 0,
             seq_ids: Optional[Sequence[int]] = None, use_cuda_graph: bool = False,
             vocab_size: Optional[int] = None) -> GenerationOutput:
    """Generate continuations of ``prompts`` (token-id lists) with a whole actor model (one stage).

    ``seq_ids``: global ids of the prompts (default 0..B-1); with (seed, step) they key the randomness,
    so a sequence gets the same tokens whatever batch or rank it is generated in.
    """
    if model.is_critic or not (model.stage.has_embedding and model.stage.has_head):
        raise ValueError("generate needs a whole actor model (one stage with the embedding and lm_head)")
    B = len(prompts)
    seq_ids = checked_seq_ids(prompts, seq_ids)
    eos = _eos_list(eos_token_id)
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    N = cfg.max_new_tokens
    capacity = max(len(p) for p in prompts) + N
    if stream_decode_usable(model, B, device):
        capacity = working_set.stream_cache_len(capacity)  # the one-launch step's whole slots
    cache = model.new_kv_cache(B, capacity)
    tokens, cu = pack_sequences(prompts, device=device)
    logits = model.prefill(tokens, cu, cache, model.prefill_chunk_tokens(cfg.lean_memory))  # [B, V]
    u_BN = None if cfg.greedy else torch.from_numpy(keyed_uniforms(seed, step, seq_ids, N)).to(device)
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out_tok, out_lp, out_mask = [], [], []
    runner = decode_runner(model, cache, use_cuda_graph and device.type == "cuda")
    for t in range(N):
        tok, lp, mask = sampling_step(logits, cfg, t, eos, None if u_BN is None else u_BN[:, t], vocab_size)
        if eos:  # (without an EOS no row ever finishes early)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            lp = torch.where(finished, torch.zeros_like(lp), lp)
        out_tok.append(tok)
        out_lp.append(lp)
        if mask is not None:
            out_mask.append(mask & ~finished[:, None])
        if eos:
            finished = finished | torch.isin(tok, eos_t)
        if t == N - 1 or (should_poll(t, eos) and bool(finished.all())):
            break
        logits = runner(tok, lengths + t)
    tokens_BN = torch.stack(out_tok, 1)
    logprobs_BN = torch.stack(out_lp, 1)
    steps = tokens_BN.shape[1]
    if eos:
        is_eos = torch.isin(tokens_BN, eos_t)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(lengths, steps))
    else:
        first = torch.full_like(lengths, steps)
    return GenerationOutput(tokens_BN, logprobs_BN, first, ~finished,
                            torch.stack(out_mask, 1) if out_mask else None)


# -- tokenisation -----------------------------------------------------------------------------------------


def load_tokenizer(path: str):
    """The checkpoint's tokenizer (``AutoTokenizer``; transformers imported here, not at module import)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_prompts(tokenizer: Callable, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt exactly as ``tokenizer(prompt)["input_ids"]`` (special tokens such as BOS included)."""
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def special_token_ids(tokenizer, generation_config: Optional[dict] = None) -> tuple[list[int], int]:
    """(EOS ids, pad id): the generation config's EOS list if given, else the tokenizer's; pad falls back to EOS."""
    eos = _eos_list((generation_config or {}).get("eos_token_id", tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id
    if pad is None:
        if not eos:
            raise UserError("tokenizer has neither a pad nor an EOS token")
        pad = eos[0]
    return eos, int(pad)
