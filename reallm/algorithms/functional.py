r"""The algorithm math of SFT, reward modeling, DPO and PPO as pure torch functions on packed sequences.

No models, no process groups: every cross-rank reduction goes through an ``all_reduce`` callback
(``tensor -> tensor``, the *sum* over the data-parallel ranks; ``None`` = one rank), so each function is
checked on one process against plain-Python references (``tests/test_algorithms_math.py``), and splitting a
batch over dp ranks or micro-batches does not change any number (NOTES.md, "Numerics that must not depend
on the layout").

Packed layouts
==============
A batch of B sequences is packed 1-D. ``cu_seqlens`` (int32 [B+1]): sequence i is tokens
``cu[i]:cu[i+1]`` (length L_i). Two layouts hold per-position quantities:

* **token layout** [T], T = cu[-1]: one entry per token (``input_ids``, ``prompt_mask``, critic
  ``values``). Entry ``cu[i] + k`` is token k of sequence i; for values it is V(s_k), the value of the
  state "tokens 0..k".
* **shifted layout** [N], N = T − B: per sequence L_i − 1 entries, at offsets
  ``short_cu = cu − arange(B+1)`` (``shifted_cu_seqlens``). Entry ``short_cu[i] + k``, k = 0..L_i−2, is
  about the *action* token k+1 taken in state s_k: its log-prob ``log π(x_{k+1} | x_{≤k})``, reward,
  advantage, return, the PPO masks. ``drop_last_per_seq`` maps token → shifted by state (k keeps V(s_k)),
  ``drop_first_per_seq`` by target (k keeps x_{k+1}); ``shifted_to_rows`` goes back to the "row t is about
  token t+1, 0 on each sequence's last row" [T] layout of the model code.
* ``action_mask`` [N] (``action_mask(prompt_mask, cu)``): True where token k+1 is not a prompt token
  (generated tokens in PPO, answer tokens in SFT/DPO). It is ReaL's ``ppo_loss_mask``.

Log-probs (``gather_logprobs``, ``gather_logprobs_chunked``)
------------------------------------------------------------
::

    z_t = logits_t / temperature,  z_t[v] = finfo.min  where removed_t[v] or v >= vocab_size
    logp[short_cu[i]+k] = z_{cu[i]+k}[x_{k+1}] − logsumexp(z_{cu[i]+k})

``removed`` is the generation's logits mask (True = filtered by top-k/top-p when that token was sampled)
so training log-probs are over the sampling support; ``vocab_size`` masks a vocabulary padded to a
multiple of tp. Neither variant forms a log-softmax [T, V]: both take the target logit minus the row's
logsumexp. ``gather_logprobs`` is plain autograd (the reference; double-backward works) whose transient fp32
[T, V] temporaries in logsumexp and its backward peak at ~10× the bf16 logits (H100, T = 8192,
V = 128256: 19.6 GiB beyond 1.96 GiB of logits, 29 ms forward + backward). ``gather_logprobs_chunked`` is
an autograd function that keeps only lse [N] and recomputes the softmax per chunk of rows in backward:
beyond the logits it needs their gradient and one fp32 [chunk, V] buffer (same case: 3.9 GiB, of which
the bf16 gradient is 1.96, 35 ms; identical values). Use it for training with large vocabularies.
``seq_sums`` sums any per-position quantity per sequence.

PPO (ReaL's semantics; deviations marked **dev**)
=================================================
Shaped rewards (``reward_score``, ``shape_rewards``), per sequence i with raw reward-model output x_i::

    score_i   = clip((x_i − reward_output_bias) · reward_output_scaling, −max_reward_clip, max_reward_clip)
    kl_r[k]   = −kl_ctl · (logp[k] − ref_logp[k])      on action entries, 0 elsewhere
    r[k]      = kl_r[k] + score_i · [k = L_i − 2]      (the score on the last generated token)

**dev**: ReaL ≤ 0.2 drops score_i when the sequence has no EOS, so with min_new_tokens = max_new_tokens
(the quickstart) no sequence ever receives its score; we add it always, as later ReaL/AReaL do by default
(``drop_score_if_no_eos=True`` restores the old rule).

GAE (``gae_torch``; ``reallm.kernels.gae`` dispatches to the CUDA kernel), over the shifted entries of
each sequence, with V the (denormalised) critic values in token layout::

    V_next[k] = V(s_{k+1})                    k < L_i − 2
              = V(s_{L_i−1}) · no_eos_i       k = L_i − 2   (bootstrap a truncated sequence; EOS is terminal)
    δ[k]  = r[k] + γ · V_next[k] − V(s_k)
    A[k]  = δ[k] + γ λ · A[k+1]               (A[L_i−1] = 0), i.e. A[k] = Σ_{m≥k} (γλ)^{m−k} δ[m]
    R[k]  = A[k] + V(s_k)                     (returns = value targets)

with γ = ``discount``, λ = ``gae_lambda``. Like ReaL the recursion runs over every shifted entry (prompt
entries have r = 0); ``ppo_targets`` zeroes A and R outside the action mask. With a prompt prefix this is
exactly GAE over the generated tokens. ``gae_torch`` pads to [B, L_max] and scans blocks of 64 entries
backwards, each block one matmul with the Toeplitz matrix M[m, j] = (γλ)^{m−j} (m ≥ j) in fp64.

KL controllers (``FixedKLController``, ``AdaptiveKLController``; Ziegler et al. 2019)::

    e = clip(KL / target − 1, −0.2, 0.2);   kl_ctl ← kl_ctl · (1 + e · n_steps / horizon)

with KL = ``mean_sequence_kl``: the mean over the *global* batch of Σ_k (logp − ref_logp) per sequence on
action entries, and n_steps the global number of sequences. **dev**: ReaL feeds the controller the mean
per-token *KL reward* −kl_ctl·KL (negative, so e = −0.2 at every call and kl_ctl only decays), and calls it
once per micro-batch in the actor but with the un-normalised sum in the critic, so the two copies drift
apart. Call ``update`` once per PPO step with the same global numbers in actor and critic.

Advantage normalisation (``normalize_advantages``), over the action entries of the *global* batch::

    n = Σ mask,  μ = Σ A / n,  σ² = Σ A² / n − μ²  (sums all-reduced, fp64)
    Â = (A − μ) / (σ + eps),  eps = 1e-5,  Â = 0 outside the mask

Value normalisation (``ValueNormalizer``, ReaL's ``ExponentialRunningMeanStd``), per PPO step with the
global returns R on action entries (β = 0.99995, eps = 1e-5)::

    m ← β m + (1−β) mean(R),  q ← β q + (1−β) mean(R²),  d ← β d + (1−β)      (d debiases; all start at 0)
    μ = m / max(d, eps),  σ = sqrt(max(q / max(d, eps) − μ², 1e-2))
    normalize(x) = clip((x − μ) / σ, −5, 5),  denormalize(y) = y · σ + μ

Before the first update μ = 0 and σ = 0.1 (ReaL's floor; kept). The PPO step (``ppo_targets``) follows
ReaL: denormalise the critic's values with the state *before* the update, run GAE, update with R, and hand
the critic ``normalize(R)`` (with the *updated* state) as its target while its old values stay normalised.
Actor and critic each hold a normaliser; the same updates keep them identical. ``state_dict`` is exact.

Actor loss (``ppo_actor_loss``), over action entries, ρ = exp(logp − old_logp), Â normalised advantages::

    ℓ[k] = max(−Â ρ, −Â clip(ρ, 1 − eps_clip, 1 + eps_clip)),     loss = Σ ℓ[k] / num_tokens

``num_tokens`` is the *global* action-token count of the minibatch (all dp ranks, all micro-batches), so
summing the losses of the pieces gives the global mean (gradients must then be *summed* over dp ranks).
Stats are sums (``reduce_stats`` adds them over pieces and ranks): ``importance_ratio_sum`` Σρ,
``clip_count`` #{−Âρ < −Â clip(ρ)}, ``approx_kl_sum`` Σ(old_logp − logp) (**dev**: ReaL logs the opposite
sign), ``loss_sum``, ``num_tokens``. ``ppo_early_stop``: skip the minibatch's optimizer step when the
global mean ρ exceeds ``early_stop_imp_ratio`` (**dev**: ReaL decides per micro-batch, which depends on
the layout; decided over the whole minibatch it does not, and the step is skipped after the backward passes).

Critic loss (``ppo_critic_loss``), V new values, V_old the values of the rollout, R (normalised) returns::

    ℓ[k] = ½ max((V − R)², (V_old + clip(V − V_old, −value_eps_clip, value_eps_clip) − R)²)
    loss = Σ ℓ[k] / num_tokens;   clip_count = #{clipped term > unclipped term}

Preference and supervised losses
================================
Pairs are index vectors into the batch's sequences: ``chosen_index`` [P], ``rejected_index`` [P]
(``pair_indices`` builds them from per-sequence pair ids and an is-chosen flag; ReaL packs each prompt's
sequences as pos, neg, pos, neg …).

DPO (``dpo_loss``), S = Σ answer-token log-probs of a sequence (``sequence_logprobs``)::

    m_p = β ((S^π_c − S^ref_c) − (S^π_r − S^ref_r)),  loss = Σ_p −log σ(m_p) / num_pairs
    stats: margin_sum Σ m_p, correct_count #{m_p > 0}, chosen_reward_sum Σ β(S^π_c − S^ref_c), …

Reward modeling (``rw_loss``), s = critic value at the last token of each sequence (``last_token_values``)::

    loss = Σ_p w_p · (−log σ(s_c − s_r)) / num_pairs,     correct_count #{s_c > s_r}

w_p defaults to 1 (global mean over pairs). ReaL weights each pair by 1/(pairs of its prompt) and sums per
micro-batch; ``pair_weights = 1/g`` with ``num_pairs`` = global number of prompts gives its loss, normalised.

SFT (``sft_loss``): ``loss = −Σ_{action k} logp[k] / num_tokens`` (answer tokens only, global count).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

#: Sums a tensor over the data-parallel ranks and returns the result (may work in place).
AllReduce = Callable[[torch.Tensor], torch.Tensor]

Stats = dict[str, torch.Tensor]

#: Rows of logits processed at a time by ``gather_logprobs_chunked``.
DEFAULT_CHUNK_ROWS = 1024

_GAE_BLOCK = 64


def _all_reduce(x: torch.Tensor, all_reduce: Optional[AllReduce]) -> torch.Tensor:
    return x if all_reduce is None else all_reduce(x)


# ---- packing ------------------------------------------------------------------------------------------


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Token count L_i of each sequence, int64 [B]."""
    cu = cu_seqlens.long()
    return cu[1:] - cu[:-1]


def shifted_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``short_cu = cu − arange(B+1)``: the offsets of the shifted layout (L_i − 1 entries per sequence)."""
    ar = torch.arange(cu_seqlens.numel(), device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return cu_seqlens - ar


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of each of the ``total`` entries delimited by ``cu_seqlens`` (int64 [total])."""
    B = cu_seqlens.numel() - 1
    ar = torch.arange(B, device=cu_seqlens.device)
    return torch.repeat_interleave(ar, seq_lengths(cu_seqlens), output_size=total)


def _shifted_token_index(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(state token index [N] of each shifted entry, its sequence id [N]); N = T − B."""
    B = cu_seqlens.numel() - 1
    N = num_tokens - B
    seg = segment_ids(shifted_cu_seqlens(cu_seqlens), N)
    return torch.arange(N, device=cu_seqlens.device) + seg, seg


def drop_last_per_seq(x_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Token → shifted layout by *state*: keeps tokens 0..L−2 of each sequence (values V(s_k), logits rows)."""
    idx, _ = _shifted_token_index(cu_seqlens, x_T.shape[0])
    return x_T[idx]


def drop_first_per_seq(x_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Token → shifted layout by *target*: keeps tokens 1..L−1 of each sequence (the predicted tokens)."""
    idx, _ = _shifted_token_index(cu_seqlens, x_T.shape[0])
    return x_T[idx + 1]


def shifted_to_rows(x_N: torch.Tensor, cu_seqlens: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Shifted → token layout "row t is about token t+1": ``fill`` on each sequence's last row."""
    B = cu_seqlens.numel() - 1
    T = x_N.shape[0] + B
    idx, _ = _shifted_token_index(cu_seqlens, T)
    out = x_N.new_full((T, *x_N.shape[1:]), fill)
    out[idx] = x_N
    return out


def action_mask(prompt_mask_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Shifted bool [N]: token k+1 of the sequence is not a prompt token (generated / answer)."""
    return ~drop_first_per_seq(prompt_mask_T.bool(), cu_seqlens)


def seq_sums(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums [B] of a packed quantity; ``cu_seqlens`` delimits x (``shifted_cu_seqlens`` for the
    shifted layout). Differentiable."""
    B = cu_seqlens.numel() - 1
    seg = segment_ids(cu_seqlens, x.shape[0])
    return x.new_zeros((B, *x.shape[1:])).index_add(0, seg, x)


def last_token_values(values_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Value at the last token of each sequence [B] (the reward model's score)."""
    return values_T[cu_seqlens[1:].long() - 1]


def global_count(mask: torch.Tensor, all_reduce: Optional[AllReduce] = None) -> torch.Tensor:
    """Number of True entries over all dp ranks (float64 0-dim tensor): the loss denominator."""
    return _all_reduce(mask.sum().to(torch.float64), all_reduce)


# ---- logits masks and log-probs -----------------------------------------------------------------------


def _mask_columns(mask_TV: torch.Tensor, vocab_start: int, width: int) -> torch.Tensor:
    """The columns [vocab_start, vocab_start + width) of a (global-vocabulary) mask, False beyond its width."""
    if vocab_start == 0 and mask_TV.shape[-1] == width:
        return mask_TV
    cols = mask_TV[..., vocab_start : vocab_start + width]
    if cols.shape[-1] < width:
        cols = F.pad(cols, (0, width - cols.shape[-1]), value=False)
    return cols


def apply_logits_mask(
    logits: torch.Tensor, removed_mask: torch.Tensor, *, vocab_start: int = 0, inplace: bool = False
) -> torch.Tensor:
    """Set logits that top-k/top-p removed at sampling time to ``finfo(dtype).min`` (ReaL's fill: finite, so a
    fully masked row stays finite). ``removed_mask`` [T, V_global] may span the global vocabulary: a tp shard
    starting at column ``vocab_start`` uses its own columns; columns beyond the mask's width are kept."""
    m = _mask_columns(removed_mask.bool(), vocab_start, logits.shape[-1])
    fill = torch.finfo(logits.dtype).min
    return logits.masked_fill_(m, fill) if inplace else logits.masked_fill(m, fill)


def mask_padded_vocab(
    logits: torch.Tensor, vocab_size: int, *, vocab_start: int = 0, inplace: bool = False
) -> torch.Tensor:
    """Set the columns of a padded vocabulary (global index ≥ ``vocab_size``) to ``finfo(dtype).min``."""
    first_pad = max(vocab_size - vocab_start, 0)
    if first_pad >= logits.shape[-1]:
        return logits
    out = logits if inplace else logits.clone()
    out[..., first_pad:] = torch.finfo(logits.dtype).min
    return out


def _prepared_logits(
    logits: torch.Tensor, temperature: float, removed: Optional[torch.Tensor], vocab_size: Optional[int]
) -> torch.Tensor:
    """fp32 logits / temperature with removed and padded columns at finfo(fp32).min; never modifies input."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    if removed is not None:
        z = z.masked_fill(_mask_columns(removed.bool(), 0, z.shape[-1]), torch.finfo(torch.float32).min)
    if vocab_size is not None and vocab_size < z.shape[-1]:
        col = torch.arange(z.shape[-1], device=z.device)
        z = z.masked_fill(col >= vocab_size, torch.finfo(torch.float32).min)
    return z


def _next_tokens(input_ids_T: torch.Tensor) -> torch.Tensor:
    """target[t] = input_ids[t+1] (the last row gets 0; such rows are dropped by the shifted layout)."""
    return F.pad(input_ids_T[1:].long(), (0, 1), value=0)


def gather_logprobs(
    logits_TV: torch.Tensor,
    input_ids_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    temperature: float = 1.0,
    logits_mask_TV: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Shifted log-probs [N] (fp32) of the next tokens; plain autograd (module docstring)."""
    z = _prepared_logits(logits_TV, temperature, logits_mask_TV, vocab_size)
    lse_T = torch.logsumexp(z, dim=-1)
    tgt_T = z.gather(-1, _next_tokens(input_ids_T)[:, None]).squeeze(-1)
    return drop_last_per_seq(tgt_T - lse_T, cu_seqlens)


class _ChunkedLogProbs(torch.autograd.Function):
    """logp[n] = log_softmax(prepared(logits[rows[n]]))[targets[n]], chunks of rows in forward and backward."""

    @staticmethod
    def forward(ctx, logits_TV, rows_N, targets_N, temperature, removed_TV, vocab_size, chunk_rows):
        N = rows_N.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=logits_TV.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits_TV.device)
        for a in range(0, N, chunk_rows):
            r = rows_N[a : a + chunk_rows]
            z = _prepared_logits(
                logits_TV.index_select(0, r),
                temperature,
                None if removed_TV is None else removed_TV.index_select(0, r),
                vocab_size,
            )
            lse[a : a + chunk_rows] = torch.logsumexp(z, dim=-1)
            out[a : a + chunk_rows] = (
                z.gather(-1, targets_N[a : a + chunk_rows, None]).squeeze(-1) - lse[a : a + chunk_rows]
            )
        ctx.save_for_backward(logits_TV, rows_N, targets_N, lse, *(() if removed_TV is None else (removed_TV,)))
        ctx.temperature, ctx.vocab_size, ctx.chunk_rows = temperature, vocab_size, chunk_rows
        ctx.has_mask = removed_TV is not None
        return out

    @staticmethod
    def backward(ctx, grad_N):
        logits_TV, rows_N, targets_N, lse, *rest = ctx.saved_tensors
        removed_TV = rest[0] if ctx.has_mask else None
        grad = torch.zeros_like(logits_TV)
        c = ctx.chunk_rows
        for a in range(0, rows_N.shape[0], c):
            r = rows_N[a : a + c]
            z = _prepared_logits(
                logits_TV.index_select(0, r),
                ctx.temperature,
                None if removed_TV is None else removed_TV.index_select(0, r),
                ctx.vocab_size,
            )
            g = grad_N[a : a + c].float()
            # d logp / d z = onehot(target) − softmax(z); z = logits / T (masked columns: softmax is exactly 0).
            gz = torch.exp(z - lse[a : a + c, None]).mul_(-g[:, None])
            gz.scatter_add_(-1, targets_N[a : a + c, None], g[:, None])
            if ctx.temperature != 1.0:
                gz.div_(ctx.temperature)
            grad.index_copy_(0, r, gz.to(grad.dtype))
        return grad, None, None, None, None, None, None


def gather_logprobs_chunked(
    logits_TV: torch.Tensor,
    input_ids_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    temperature: float = 1.0,
    logits_mask_TV: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Same as ``gather_logprobs``; memory beyond logits and their gradient: one fp32 [chunk_rows, V]."""
    rows, _ = _shifted_token_index(cu_seqlens, logits_TV.shape[0])
    targets = input_ids_T.long()[rows + 1]
    mask = None if logits_mask_TV is None else logits_mask_TV.bool()
    return _ChunkedLogProbs.apply(logits_TV, rows, targets, float(temperature), mask, vocab_size, int(chunk_rows))


# ---- PPO: rewards, GAE, KL control --------------------------------------------------------------------


def reward_score(
    raw_B: torch.Tensor,
    *,
    reward_output_bias: float = 0.0,
    reward_output_scaling: float = 1.0,
    max_reward_clip: float = 20.0,
) -> torch.Tensor:
    """clip((x − bias) · scaling, −max_reward_clip, max_reward_clip), fp32 [B]."""
    s = (raw_B.float() - reward_output_bias) * reward_output_scaling
    return s.clamp(-max_reward_clip, max_reward_clip)


def shape_rewards(
    logprobs_N: torch.Tensor,
    ref_logprobs_N: torch.Tensor,
    scores_B: torch.Tensor,
    action_mask_N: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    kl_ctl: float,
    seq_no_eos_mask_B: Optional[torch.Tensor] = None,
    drop_score_if_no_eos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl_rewards [N], rewards [N]), fp32: KL penalty on action entries, ``scores_B`` (already
    ``reward_score``-shaped) added on each sequence's last entry. Sequences need L_i ≥ 2."""
    diff = torch.where(action_mask_N, logprobs_N.float() - ref_logprobs_N.float(), 0.0)
    kl_rewards = -kl_ctl * diff
    score = scores_B.float()
    if drop_score_if_no_eos:
        if seq_no_eos_mask_B is None:
            raise ValueError("drop_score_if_no_eos needs seq_no_eos_mask_B")
        score = torch.where(seq_no_eos_mask_B.bool(), 0.0, score)
    last = shifted_cu_seqlens(cu_seqlens)[1:].long() - 1
    rewards = kl_rewards.index_add(0, last, score)
    return kl_rewards, rewards


def gae_torch(
    rewards_N: torch.Tensor,
    values_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bootstrap_B: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the shifted entries of each sequence (module docstring): (advantages [N], returns [N]).

    ``values_T`` are the (denormalised) critic values in token layout; ``bootstrap_B`` (= seq_no_eos_mask)
    keeps V(s_{L−1}) as the next value of the last entry. Computed in fp64, returned in the rewards' dtype.
    """
    B = cu_seqlens.numel() - 1
    N, T = rewards_N.shape[0], values_T.shape[0]
    if T != N + B:
        raise ValueError(f"values have {T} entries, rewards {N}, sequences {B}: expected T = N + B")
    dev, out_dtype = rewards_N.device, (rewards_N.dtype if rewards_N.is_floating_point() else torch.float32)
    if N == 0:
        return rewards_N.new_zeros(0, dtype=out_dtype), rewards_N.new_zeros(0, dtype=out_dtype)
    tok, seg = _shifted_token_index(cu_seqlens, T)
    n_B = seq_lengths(cu_seqlens) - 1
    short_cu = shifted_cu_seqlens(cu_seqlens).long()
    pos = torch.arange(N, device=dev) - short_cu[seg]
    v = values_T.to(torch.float64)
    is_last = pos == n_B[seg] - 1
    v_next = torch.where(is_last & ~bootstrap_B.bool()[seg], 0.0, v[tok + 1])
    delta = rewards_N.to(torch.float64) + gamma * v_next - v[tok]

    C = _GAE_BLOCK
    num_blocks = -(-int(n_B.max()) // C)
    D = torch.zeros(B, num_blocks * C, dtype=torch.float64, device=dev)
    D[seg, pos] = delta
    c = torch.tensor(gamma * lam, dtype=torch.float64, device=dev)
    j = torch.arange(C, device=dev)
    e = j[:, None] - j[None, :]  # m − j
    M = torch.where(e >= 0, c ** e.clamp(min=0), 0.0)  # M[m, j] = c^(m−j), m ≥ j (0^0 = 1)
    carry_pow = c ** (C - j)  # c^(C−j): weight of the next block's first advantage
    A = torch.empty_like(D)
    carry = torch.zeros(B, dtype=torch.float64, device=dev)
    for blk in reversed(range(num_blocks)):
        a = D[:, blk * C : (blk + 1) * C] @ M + carry[:, None] * carry_pow[None, :]
        A[:, blk * C : (blk + 1) * C] = a
        carry = a[:, 0]
    adv = A[seg, pos]
    return adv.to(out_dtype), (adv + v[tok]).to(out_dtype)


def gae(
    rewards_N: torch.Tensor,
    values_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_no_eos_mask_B: torch.Tensor,
    *,
    discount: float,
    gae_lambda: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with the CUDA kernel for CUDA tensors when it builds (``reallm.kernels.gae``), else ``gae_torch``."""
    from reallm.kernels.gae import gae as _dispatch

    return _dispatch(rewards_N, values_T, cu_seqlens, seq_no_eos_mask_B, discount, gae_lambda, backend=backend)


def mean_sequence_kl(
    logprobs_N: torch.Tensor,
    ref_logprobs_N: torch.Tensor,
    action_mask_N: torch.Tensor,
    cu_seqlens: torch.Tensor,
    all_reduce: Optional[AllReduce] = None,
) -> tuple[float, int]:
    """(mean over the global batch of Σ_k (logp − ref_logp) per sequence on action entries, global #seqs)."""
    diff = torch.where(action_mask_N, logprobs_N.double() - ref_logprobs_N.double(), 0.0)
    B = cu_seqlens.numel() - 1
    s = torch.stack([diff.sum(), torch.tensor(float(B), dtype=torch.float64, device=diff.device)])
    total, n = _all_reduce(s, all_reduce).tolist()
    return (total / n if n > 0 else 0.0), int(round(n))


class FixedKLController:
    """kl_ctl stays at its initial value."""

    def __init__(self, kl_ctl: float):
        self.value = float(kl_ctl)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): kl_ctl ← kl_ctl · (1 + clip(KL/target − 1, ±0.2) · n_steps / horizon)."""

    def __init__(self, kl_ctl: float, target: float, horizon: float):
        super().__init__(kl_ctl)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl`` and ``n_steps`` from ``mean_sequence_kl`` (global mean per-sequence KL, #sequences)."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    kl_ctl: float,
    use_adaptive_kl_ctl: bool = False,
    adaptive_kl_target: float = 6.0,
    adaptive_kl_horizon: float = 10000.0,
) -> FixedKLController:
    if use_adaptive_kl_ctl:
        return AdaptiveKLController(kl_ctl, adaptive_kl_target, adaptive_kl_horizon)
    return FixedKLController(kl_ctl)


# ---- PPO: normalisation -------------------------------------------------------------------------------


def masked_moments(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, all_reduce: Optional[AllReduce] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (count, mean, biased var) of x over the mask, fp64 0-dim tensors; one all-reduce."""
    x = x.detach().to(torch.float64)
    if mask is not None:
        m = mask.to(torch.float64)
        x = x * m
        n = m.sum()
    else:
        n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    s = _all_reduce(torch.stack([n, x.sum(), x.square().sum()]), all_reduce)
    n, mean = s[0], s[1] / s[0].clamp(min=1.0)
    var = (s[2] / s[0].clamp(min=1.0) - mean.square()).clamp(min=0.0)
    return n, mean, var


def normalize_advantages(
    advantages_N: torch.Tensor, mask_N: torch.Tensor, all_reduce: Optional[AllReduce] = None, eps: float = 1e-5
) -> torch.Tensor:
    """(A − μ) / (σ + eps) with global masked moments; fp32, 0 outside the mask."""
    _, mean, var = masked_moments(advantages_N, mask_N, all_reduce)
    out = (advantages_N.to(torch.float64) - mean) / (var.sqrt() + eps)
    return torch.where(mask_N, out, 0.0).float()


class ValueNormalizer:
    """Exponential running mean/std of the returns with debiasing (ReaL's ``ExponentialRunningMeanStd``).

    State is three fp64 Python floats, so ``state_dict`` / ``load_state_dict`` resume bit-exactly.
    """

    def __init__(self, beta: float = 0.99995, eps: float = 1e-5, var_floor: float = 1e-2, clip: float = 5.0):
        self.beta, self.eps, self.var_floor, self.clip = float(beta), float(eps), float(var_floor), float(clip)
        self.mean = self.mean_sq = self.debias = 0.0

    def update(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, all_reduce: Optional[AllReduce] = None
    ) -> None:
        """One EMA step with the global masked mean of x and of x²."""
        x = x.detach().to(torch.float64)
        if mask is not None:
            m = mask.to(torch.float64)
            x, n = x * m, m.sum()
        else:
            n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
        n, s1, s2 = _all_reduce(torch.stack([n, x.sum(), x.square().sum()]), all_reduce).tolist()
        if n <= 0:
            raise ValueError("ValueNormalizer.update: no entries in the mask on any rank")
        b = self.beta
        self.mean = b * self.mean + (1.0 - b) * (s1 / n)
        self.mean_sq = b * self.mean_sq + (1.0 - b) * (s2 / n)
        self.debias = b * self.debias + (1.0 - b)

    def mean_std(self) -> tuple[float, float]:
        d = max(self.debias, self.eps)
        mean = self.mean / d
        var = max(self.mean_sq / d - mean * mean, self.var_floor)
        return mean, math.sqrt(var)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean_std()
        return ((x.to(torch.float64) - mean) / std).clamp(-self.clip, self.clip).float()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean_std()
        return (x.to(torch.float64) * std + mean).float()

    def state_dict(self) -> dict[str, float]:
        return {
            "mean": self.mean,
            "mean_sq": self.mean_sq,
            "debias": self.debias,
            "beta": self.beta,
            "eps": self.eps,
            "var_floor": self.var_floor,
            "clip": self.clip,
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        for k in ("mean", "mean_sq", "debias", "beta", "eps", "var_floor", "clip"):
            setattr(self, k, float(state[k]))


# ---- PPO: one step's targets --------------------------------------------------------------------------


def ppo_targets(
    *,
    cu_seqlens: torch.Tensor,
    prompt_mask_T: torch.Tensor,
    logprobs_N: torch.Tensor,
    ref_logprobs_N: torch.Tensor,
    values_T: torch.Tensor,
    raw_rewards_B: torch.Tensor,
    seq_no_eos_mask_B: torch.Tensor,
    kl_ctl: float,
    discount: float = 1.0,
    gae_lambda: float = 1.0,
    max_reward_clip: float = 20.0,
    reward_output_scaling: float = 1.0,
    reward_output_bias: float = 0.0,
    adv_norm: bool = True,
    value_normalizer: Optional[ValueNormalizer] = None,
    drop_score_if_no_eos: bool = False,
    all_reduce: Optional[AllReduce] = None,
    gae_backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Everything actor_train and critic_train need from one PPO step's rollout (this dp rank's share).

    ``values_T`` are the critic's outputs (normalised when ``value_normalizer`` is given); updates
    ``value_normalizer`` in place. Returns shifted [N] tensors: ``action_mask``, ``kl_rewards``, ``rewards``,
    ``advantages`` (normalised if ``adv_norm``), ``returns`` (denormalised), ``critic_targets``
    (``normalize(returns)`` or the returns), ``old_values`` (critic outputs of the states, as given).
    """
    mask = action_mask(prompt_mask_T, cu_seqlens)
    values = values_T.float()
    dvalues = values if value_normalizer is None else value_normalizer.denormalize(values)
    scores = reward_score(
        raw_rewards_B,
        reward_output_bias=reward_output_bias,
        reward_output_scaling=reward_output_scaling,
        max_reward_clip=max_reward_clip,
    )
    kl_rewards, rewards = shape_rewards(
        logprobs_N,
        ref_logprobs_N,
        scores,
        mask,
        cu_seqlens,
        kl_ctl=kl_ctl,
        seq_no_eos_mask_B=seq_no_eos_mask_B,
        drop_score_if_no_eos=drop_score_if_no_eos,
    )
    adv, ret = gae(
        rewards, dvalues, cu_seqlens, seq_no_eos_mask_B, discount=discount, gae_lambda=gae_lambda, backend=gae_backend
    )
    adv, ret = torch.where(mask, adv, 0.0), torch.where(mask, ret, 0.0)
    if value_normalizer is not None:
        value_normalizer.update(ret, mask, all_reduce)
        critic_targets = torch.where(mask, value_normalizer.normalize(ret), 0.0)
    else:
        critic_targets = ret
    if adv_norm:
        adv = normalize_advantages(adv, mask, all_reduce)
    return {
        "action_mask": mask,
        "kl_rewards": kl_rewards,
        "rewards": rewards,
        "advantages": adv,
        "returns": ret,
        "critic_targets": critic_targets,
        "old_values": drop_last_per_seq(values, cu_seqlens),
    }


# ---- PPO: losses --------------------------------------------------------------------------------------


def _as_denominator(num: Union[int, float, torch.Tensor]) -> Union[float, torch.Tensor]:
    if isinstance(num, torch.Tensor):
        return num.clamp(min=1.0)
    return max(float(num), 1.0)


def ppo_actor_loss(
    logprobs_N: torch.Tensor,
    old_logprobs_N: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_N: torch.Tensor,
    *,
    eps_clip: float,
    num_tokens: Union[int, float, torch.Tensor],
) -> tuple[torch.Tensor, Stats]:
    """Clipped surrogate, summed over action entries and divided by the global token count."""
    lp = logprobs_N.float()
    # Mask the log-ratio before exp: exp of garbage on masked entries would poison the gradient (0 · inf).
    log_ratio = torch.where(mask_N, lp - old_logprobs_N.float(), 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages_N.float()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    per_token = torch.where(mask_N, torch.maximum(loss1, loss2), 0.0)
    loss = per_token.sum() / _as_denominator(num_tokens)
    with torch.no_grad():
        f64 = torch.float64
        stats = {
            "num_tokens": mask_N.sum().to(f64),
            "loss_sum": per_token.to(f64).sum(),
            "importance_ratio_sum": torch.where(mask_N, ratio, 0.0).to(f64).sum(),
            "clip_count": ((loss1 < loss2) & mask_N).sum().to(f64),
            "approx_kl_sum": (-log_ratio).to(f64).sum(),
        }
    return loss, stats


def ppo_early_stop(stats: Mapping[str, float], early_stop_imp_ratio: Optional[float]) -> bool:
    """True (skip this minibatch's optimizer step) when the mean importance ratio of the *reduced* stats
    (``reduce_stats`` over all micro-batches and dp ranks of the minibatch) exceeds the threshold."""
    if early_stop_imp_ratio is None or stats["num_tokens"] <= 0:
        return False
    return stats["importance_ratio_sum"] / stats["num_tokens"] > early_stop_imp_ratio


def ppo_critic_loss(
    values_N: torch.Tensor,
    old_values_N: torch.Tensor,
    returns_N: torch.Tensor,
    mask_N: torch.Tensor,
    *,
    value_eps_clip: float,
    num_tokens: Union[int, float, torch.Tensor],
) -> tuple[torch.Tensor, Stats]:
    """½ max of clipped / unclipped squared error, summed over action entries / global token count."""
    v, v_old, ret = values_N.float(), old_values_N.float(), returns_N.float()
    loss_orig = 0.5 * (v - ret).square()
    v_clipped = v_old + (v - v_old).clamp(-value_eps_clip, value_eps_clip)
    loss_clip = 0.5 * (v_clipped - ret).square()
    per_token = torch.where(mask_N, torch.maximum(loss_orig, loss_clip), 0.0)
    loss = per_token.sum() / _as_denominator(num_tokens)
    with torch.no_grad():
        stats = {
            "num_tokens": mask_N.sum().to(torch.float64),
            "loss_sum": per_token.to(torch.float64).sum(),
            "clip_count": ((loss_clip > loss_orig) & mask_N).sum().to(torch.float64),
        }
    return loss, stats


def reduce_stats(stats: Union[Stats, Sequence[Stats]], all_reduce: Optional[AllReduce] = None) -> dict[str, float]:
    """Sum stat dicts over micro-batches (a sequence) and dp ranks (one all-reduce); Python floats."""
    parts = [stats] if isinstance(stats, Mapping) else list(stats)
    keys = sorted(parts[0])
    local = torch.stack([sum(p[k].to(torch.float64) for p in parts) for k in keys])
    return dict(zip(keys, _all_reduce(local, all_reduce).tolist(), strict=True))


# ---- DPO, reward modeling, SFT ------------------------------------------------------------------------


def pair_indices(pair_ids_B: torch.Tensor, is_chosen_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_index [P], rejected_index [P]) ordered by pair id; each id must have one chosen, one rejected."""
    ids = pair_ids_B.long()
    order = torch.argsort(ids * 2 + (~is_chosen_B.bool()).long(), stable=True)
    if order.numel() % 2:
        raise ValueError("pair_indices: odd number of sequences")
    chosen, rejected = order[0::2], order[1::2]
    ok = (ids[chosen] == ids[rejected]) & is_chosen_B[chosen].bool() & ~is_chosen_B[rejected].bool()
    if not bool(ok.all()):
        raise ValueError("pair_indices: every pair id needs exactly one chosen and one rejected sequence")
    return chosen, rejected


def interleaved_pairs(num_seqs: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ReaL's packing: sequences pos, neg, pos, neg, …  → (0, 2, 4, …), (1, 3, 5, …)."""
    if num_seqs % 2:
        raise ValueError("interleaved_pairs: odd number of sequences")
    return torch.arange(0, num_seqs, 2, device=device), torch.arange(1, num_seqs, 2, device=device)


def sequence_logprobs(logprobs_N: torch.Tensor, mask_N: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Σ of shifted log-probs over the mask (answer tokens) per sequence, fp32 [B]."""
    return seq_sums(torch.where(mask_N, logprobs_N.float(), 0.0), shifted_cu_seqlens(cu_seqlens))


def dpo_loss(
    policy_seq_logps_B: torch.Tensor,
    ref_seq_logps_B: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    *,
    beta: float,
    num_pairs: Union[int, float, torch.Tensor],
) -> tuple[torch.Tensor, Stats]:
    """−log σ(β (Δπ − Δref)) summed over pairs / global pair count (module docstring)."""
    pi, ref = policy_seq_logps_B.float(), ref_seq_logps_B.float()
    chosen_reward = beta * (pi[chosen_index] - ref[chosen_index])
    rejected_reward = beta * (pi[rejected_index] - ref[rejected_index])
    margin = chosen_reward - rejected_reward
    per_pair = -F.logsigmoid(margin)
    loss = per_pair.sum() / _as_denominator(num_pairs)
    with torch.no_grad():
        f64 = torch.float64
        stats = {
            "num_pairs": torch.tensor(float(margin.numel()), dtype=f64, device=margin.device),
            "loss_sum": per_pair.to(f64).sum(),
            "margin_sum": margin.to(f64).sum(),
            "correct_count": (margin > 0).sum().to(f64),
            "chosen_reward_sum": chosen_reward.to(f64).sum(),
            "rejected_reward_sum": rejected_reward.to(f64).sum(),
        }
    return loss, stats


def rw_loss(
    scores_B: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    *,
    num_pairs: Union[int, float, torch.Tensor],
    pair_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Stats]:
    """Bradley–Terry: Σ_p w_p · −log σ(s_c − s_r) / num_pairs (module docstring)."""
    s = scores_B.float()
    pos, neg = s[chosen_index], s[rejected_index]
    per_pair = -F.logsigmoid(pos - neg)
    if pair_weights is not None:
        per_pair = per_pair * pair_weights.float()
    loss = per_pair.sum() / _as_denominator(num_pairs)
    with torch.no_grad():
        f64 = torch.float64
        stats = {
            "num_pairs": torch.tensor(float(pos.numel()), dtype=f64, device=s.device),
            "loss_sum": per_pair.to(f64).sum(),
            "correct_count": (pos > neg).sum().to(f64),
            "pos_score_sum": pos.to(f64).sum(),
            "neg_score_sum": neg.to(f64).sum(),
        }
    return loss, stats


def sft_loss(
    logits_TV: torch.Tensor,
    input_ids_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prompt_mask_T: torch.Tensor,
    *,
    num_tokens: Union[int, float, torch.Tensor],
    chunk_rows: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, Stats]:
    """Next-token cross entropy on answer tokens, summed / global answer-token count."""
    if chunk_rows is None:
        lp = gather_logprobs(logits_TV, input_ids_T, cu_seqlens, vocab_size=vocab_size)
    else:
        lp = gather_logprobs_chunked(logits_TV, input_ids_T, cu_seqlens, vocab_size=vocab_size, chunk_rows=chunk_rows)
    mask = action_mask(prompt_mask_T, cu_seqlens)
    nll = torch.where(mask, -lp, 0.0).sum()
    loss = nll / _as_denominator(num_tokens)
    stats = {
        "num_tokens": mask.sum().to(torch.float64),
        "loss_sum": torch.where(mask, -lp.detach(), 0.0).to(torch.float64).sum(),
    }
    return loss, stats
