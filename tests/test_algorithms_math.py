"""reallm.algorithms.functional against independent references.

References are plain-Python loops over per-sequence lists (scalar torch ops only where a gradient is
compared); they never call the functions under test. Layout independence runs the same batch split over 2
or 3 fake dp ranks (threads with a summing all-reduce) and micro-batches, and compares with one batch.
"""

from __future__ import annotations

import math
import random
import struct
import threading

import pytest
import torch
import torch.nn.functional as F

from reallm.algorithms import functional as fn

torch.set_num_threads(1)


# ---- fixtures: random batches as per-sequence lists, and their packed form -----------------------------


def f32(x: float) -> float:
    """Round to fp32, so references in Python floats see exactly the values the fp32 tensors hold."""
    return struct.unpack("f", struct.pack("f", x))[0]


def make_seqs(
    seed: int, num_seqs: int = 7, vocab: int = 11, max_prompt: int = 5, max_gen: int = 7, min_gen: int = 1
) -> list[dict]:
    rng = random.Random(seed)
    seqs = []
    for _ in range(num_seqs):
        P, G = rng.randint(1, max_prompt), rng.randint(min_gen, max_gen)
        L = P + G
        logp = [-3.0 * rng.random() for _ in range(L - 1)]
        seqs.append(
            {
                "P": P,
                "L": L,
                "tokens": [rng.randrange(vocab) for _ in range(L)],
                "logp": logp,
                "ref": [-3.0 * rng.random() for _ in range(L - 1)],
                "old": [x + rng.uniform(-0.5, 0.5) for x in logp],
                "adv": [rng.gauss(0.0, 1.0) for _ in range(L - 1)],
                "values": [rng.gauss(0.0, 1.0) for _ in range(L)],
                "new_values": [rng.gauss(0.0, 1.0) for _ in range(L)],
                "raw": rng.gauss(0.0, 1.0) * 8.0,
                "no_eos": rng.random() < 0.5,
            }
        )
    for s in seqs:
        for key in ("logp", "ref", "old", "adv", "values", "new_values"):
            s[key] = [f32(x) for x in s[key]]
        s["raw"] = f32(s["raw"])
    return seqs


def pack(seqs: list[dict]) -> dict[str, torch.Tensor]:
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + s["L"])
    flat = lambda key: [x for s in seqs for x in s[key]]  # noqa: E731
    return {
        "cu": torch.tensor(cu, dtype=torch.int32),
        "tokens": torch.tensor(flat("tokens")),
        "prompt_mask": torch.tensor([k < s["P"] for s in seqs for k in range(s["L"])]),
        "logp": torch.tensor(flat("logp")),
        "ref": torch.tensor(flat("ref")),
        "old": torch.tensor(flat("old")),
        "adv": torch.tensor(flat("adv")),
        "values": torch.tensor(flat("values")),
        "new_values": torch.tensor(flat("new_values")),
        "raw": torch.tensor([s["raw"] for s in seqs]),
        "no_eos": torch.tensor([s["no_eos"] for s in seqs]),
    }


def gen_entries(s: dict) -> range:
    """Shifted entries k whose target token k+1 is generated."""
    return range(s["P"] - 1, s["L"] - 1)


def flat_mask(seqs: list[dict]) -> list[bool]:
    return [k in gen_entries(s) for s in seqs for k in range(s["L"] - 1)]


def close(a, b, tol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).abs() / (1 + b.abs())).max().item() if a.numel() else 0.0
    assert err <= tol, f"max rel err {err:.3g} > {tol}"


class ThreadGroup:
    """n fake dp ranks as threads; ``all_reduce`` sums in rank order, so every rank gets identical bits."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=20)
        self.slots: list = [None] * n

    def _all_reduce(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for x in self.slots[1:]:
                total += x
            self.barrier.wait()
            return total

        return all_reduce

    def run(self, fn_rank):
        results, errors = [None] * self.n, []

        def work(rank):
            try:
                results[rank] = fn_rank(rank, self._all_reduce(rank))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def split(seqs: list, parts: int) -> list[list]:
    """Contiguous, uneven split (the first part is the largest)."""
    bounds = [0] + [len(seqs) * (i + 1) // parts for i in range(parts)]
    bounds[1] += 1 if bounds[2] - bounds[1] > 1 else 0
    return [seqs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---- packing helpers ----------------------------------------------------------------------------------


def test_layout_helpers_match_loops():
    seqs = make_seqs(0, num_seqs=6)
    b = pack(seqs)
    cu = b["cu"]
    assert fn.shifted_cu_seqlens(cu).tolist() == [c - i for i, c in enumerate(cu.tolist())]
    tok = b["tokens"]
    assert fn.drop_last_per_seq(tok, cu).tolist() == [x for s in seqs for x in s["tokens"][:-1]]
    assert fn.drop_first_per_seq(tok, cu).tolist() == [x for s in seqs for x in s["tokens"][1:]]
    assert fn.action_mask(b["prompt_mask"], cu).tolist() == flat_mask(seqs)
    rows = fn.shifted_to_rows(b["logp"], cu)
    close(rows, [x for s in seqs for x in s["logp"] + [0.0]], 1e-7)
    assert fn.drop_last_per_seq(rows, cu).tolist() == b["logp"].tolist()
    sums = fn.seq_sums(b["logp"], fn.shifted_cu_seqlens(cu))
    close(sums, [sum(s["logp"]) for s in seqs], 1e-6)
    close(fn.last_token_values(b["values"], cu), [s["values"][-1] for s in seqs], 1e-7)
    assert fn.global_count(fn.action_mask(b["prompt_mask"], cu)).item() == sum(flat_mask(seqs))


def test_logits_mask_and_padded_vocab():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 12, generator=g)
    removed = torch.rand(5, 12, generator=g) < 0.3
    out = fn.apply_logits_mask(logits, removed)
    fmin = torch.finfo(torch.float32).min
    for t in range(5):
        for v in range(12):
            assert out[t, v].item() == (fmin if removed[t, v] else logits[t, v].item())
    # A tp shard holding global columns 6..11 uses its own slice of the global mask.
    shard = fn.apply_logits_mask(logits[:, 6:], removed, vocab_start=6)
    assert torch.equal(shard, out[:, 6:])
    # A mask recorded over the real vocabulary (10) on logits padded to 12 keeps the padding columns.
    assert torch.equal(fn.apply_logits_mask(logits, removed[:, :10])[:, 10:], logits[:, 10:])
    padded = fn.mask_padded_vocab(logits, 10)
    assert (padded[:, 10:] == fmin).all() and torch.equal(padded[:, :10], logits[:, :10])
    assert torch.equal(fn.mask_padded_vocab(logits[:, 6:], 10, vocab_start=6), padded[:, 6:])
    assert torch.equal(fn.mask_padded_vocab(logits[:, :6], 10), logits[:, :6])
    bf = fn.apply_logits_mask(logits.bfloat16(), removed)
    assert (bf[removed] == torch.finfo(torch.bfloat16).min).all()
    inplace = logits.clone()
    fn.apply_logits_mask(inplace, removed, inplace=True)
    assert torch.equal(inplace, out)


def _ref_logprobs(
    logits: torch.Tensor,
    seqs: list[dict],
    cu: list[int],
    temperature: float,
    removed: torch.Tensor | None,
    vocab_size: int | None,
) -> torch.Tensor:
    """Per sequence, per position: log_softmax of the masked, tempered row, at the next token."""
    out = []
    for i, s in enumerate(seqs):
        for k in range(s["L"] - 1):
            z = logits[cu[i] + k].double() / temperature
            if removed is not None:
                z = z.masked_fill(removed[cu[i] + k], -math.inf)
            if vocab_size is not None:
                z = torch.cat([z[:vocab_size], torch.full((z.numel() - vocab_size,), -math.inf, dtype=z.dtype)])
            out.append(torch.log_softmax(z, -1)[s["tokens"][k + 1]])
    return torch.stack(out)


@pytest.mark.parametrize("temperature,use_mask,vocab_size", [(1.0, False, None), (0.7, True, 10), (1.3, True, None)])
def test_gather_logprobs_values_and_grads(temperature, use_mask, vocab_size):
    seqs = make_seqs(2, num_seqs=5, vocab=10)
    b = pack(seqs)
    T, V = b["tokens"].numel(), 12
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64).float()
    removed = None
    if use_mask:
        removed = torch.rand(T, V, generator=g) < 0.3
        removed[torch.arange(T - 1), b["tokens"][1:]] = False  # the sampled token is always in the support
    cu = b["cu"].tolist()
    x_ref = logits.clone().requires_grad_(True)
    ref = _ref_logprobs(x_ref, seqs, cu, temperature, removed, vocab_size)
    w = torch.randn(ref.numel(), generator=g, dtype=torch.float64)
    (ref * w).sum().backward()
    for variant in ("plain", "chunked"):
        x = logits.clone().requires_grad_(True)
        kw = dict(temperature=temperature, logits_mask_TV=removed, vocab_size=vocab_size)
        if variant == "plain":
            lp = fn.gather_logprobs(x, b["tokens"], b["cu"], **kw)
        else:
            lp = fn.gather_logprobs_chunked(x, b["tokens"], b["cu"], chunk_rows=4, **kw)
        assert lp.dtype == torch.float32
        close(lp, ref.detach(), 1e-5)
        (lp.double() * w).sum().backward()
        close(x.grad, x_ref.grad, 1e-5)
        assert torch.isfinite(x.grad).all()


def test_gather_logprobs_chunked_bf16():
    seqs = make_seqs(4, num_seqs=4, vocab=16)
    b = pack(seqs)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(b["tokens"].numel(), 16, generator=g).bfloat16().requires_grad_(True)
    lp = fn.gather_logprobs_chunked(logits, b["tokens"], b["cu"], chunk_rows=5)
    ref = fn.gather_logprobs(logits.float(), b["tokens"], b["cu"])
    close(lp, ref.detach(), 1e-6)
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


# ---- PPO references -----------------------------------------------------------------------------------


def ref_rewards(s: dict, kl_ctl: float, scale: float, bias: float, clip: float, drop_no_eos: bool = False):
    score = min(max((s["raw"] - bias) * scale, -clip), clip)
    klr = [0.0] * (s["L"] - 1)
    for k in gen_entries(s):
        klr[k] = -kl_ctl * (s["logp"][k] - s["ref"][k])
    r = list(klr)
    if not (drop_no_eos and s["no_eos"]):
        r[-1] += score
    return klr, r


def ref_gae(r: list[float], V: list[float], no_eos: bool, gamma: float, lam: float, entries):
    """Reverse loop over the given entries (a suffix of the sequence); 0 elsewhere."""
    n = len(r)
    adv, a = [0.0] * n, 0.0
    for k in reversed(list(entries)):
        nxt = V[k + 1] if k < n - 1 else (V[n] if no_eos else 0.0)
        a = r[k] + gamma * nxt - V[k] + gamma * lam * a
        adv[k] = a
    ret = [adv[k] + V[k] if k in entries else 0.0 for k in range(n)]
    return adv, ret


class RefValueNorm:
    def __init__(self, beta, eps):
        self.beta, self.eps, self.m, self.q, self.d = beta, eps, 0.0, 0.0, 0.0

    def update(self, xs: list[float]):
        mean = sum(xs) / len(xs)
        mean_sq = sum(x * x for x in xs) / len(xs)
        self.m = self.beta * self.m + (1 - self.beta) * mean
        self.q = self.beta * self.q + (1 - self.beta) * mean_sq
        self.d = self.beta * self.d + (1 - self.beta)

    def mean_std(self):
        d = max(self.d, self.eps)
        mu = self.m / d
        return mu, math.sqrt(max(self.q / d - mu * mu, 1e-2))

    def normalize(self, x):
        mu, sd = self.mean_std()
        return min(max((x - mu) / sd, -5.0), 5.0)

    def denormalize(self, x):
        mu, sd = self.mean_std()
        return x * sd + mu


def ref_adv_norm(advs: list[float], mask: list[bool], eps: float = 1e-5) -> list[float]:
    xs = [a for a, m in zip(advs, mask, strict=True) if m]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    return [(a - mean) / (math.sqrt(var) + eps) if m else 0.0 for a, m in zip(advs, mask, strict=True)]


@pytest.mark.parametrize("drop_no_eos", [False, True])
def test_shaped_rewards(drop_no_eos):
    seqs = make_seqs(10)
    assert 0 < sum(s["no_eos"] for s in seqs) < len(seqs)
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    scores = fn.reward_score(b["raw"], reward_output_bias=0.5, reward_output_scaling=3.0, max_reward_clip=7.0)
    close(scores, [min(max((s["raw"] - 0.5) * 3.0, -7.0), 7.0) for s in seqs], 1e-6)
    assert (scores.abs() == 7.0).any(), "the fixture should exercise the clip"
    klr, r = fn.shape_rewards(
        b["logp"],
        b["ref"],
        scores,
        mask,
        b["cu"],
        kl_ctl=0.13,
        seq_no_eos_mask_B=b["no_eos"],
        drop_score_if_no_eos=drop_no_eos,
    )
    refs = [ref_rewards(s, 0.13, 3.0, 0.5, 7.0, drop_no_eos) for s in seqs]
    close(klr, [x for k, _ in refs for x in k], 1e-6)
    close(r, [x for _, rr in refs for x in rr], 1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.99, 0.95), (0.7, 0.0), (1.0, 0.5)])
def test_gae_torch_long_sequences(gamma, lam):
    # Lengths cross the 64-entry blocks several times; a length-1 sequence has no entries at all.
    rng = random.Random(int(gamma * 100 + lam * 10))
    lens = [1, 2, 3, 64, 65, 130, 200] + [rng.randint(2, 150) for _ in range(5)]
    rng.shuffle(lens)
    rs = [[rng.gauss(0, 1) for _ in range(L - 1)] for L in lens]
    vs = [[rng.gauss(0, 1) for _ in range(L)] for L in lens]
    boot = [rng.random() < 0.5 for _ in lens]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    adv, ret = fn.gae_torch(
        torch.tensor([x for r in rs for x in r]),
        torch.tensor([x for v in vs for x in v]),
        cu,
        torch.tensor(boot),
        gamma,
        lam,
    )
    ref = [ref_gae(r, v, bt, gamma, lam, range(len(r))) for r, v, bt in zip(rs, vs, boot, strict=True)]
    close(adv, [x for a, _ in ref for x in a], 2e-6)
    close(ret, [x for _, rt in ref for x in rt], 2e-6)
    # The dispatcher takes the torch path on CPU.
    from reallm.kernels import gae as kgae

    a2, r2 = kgae.gae(
        torch.tensor([x for r in rs for x in r]),
        torch.tensor([x for v in vs for x in v]),
        cu,
        torch.tensor(boot),
        gamma,
        lam,
    )
    assert torch.equal(a2, adv) and torch.equal(r2, ret)


def test_gae_kernel_unavailable_on_cpu():
    from reallm.kernels import gae as kgae

    if torch.cuda.is_available():
        pytest.skip("CUDA machine: bench/bench_gae_gpu.py checks the kernel")
    assert not kgae.gae_cuda_available()
    with pytest.raises(RuntimeError):
        kgae.gae(
            torch.zeros(1),
            torch.zeros(2),
            torch.tensor([0, 2], dtype=torch.int32),
            torch.tensor([True]),
            1.0,
            1.0,
            backend="cuda",
        )


def test_adaptive_and_fixed_kl_controllers():
    seqs = make_seqs(11)
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    kl, n = fn.mean_sequence_kl(b["logp"], b["ref"], mask, b["cu"])
    ref_kl = sum(sum(s["logp"][k] - s["ref"][k] for k in gen_entries(s)) for s in seqs) / len(seqs)
    assert n == len(seqs) and abs(kl - ref_kl) < 1e-9
    ctl = fn.make_kl_controller(0.1, True, adaptive_kl_target=6.0, adaptive_kl_horizon=100.0)
    fixed = fn.make_kl_controller(0.1, False)
    value = 0.1
    for current, steps in [(1.0, 8), (6.5, 8), (12.0, 16), (6.0, 4), (-3.0, 8)]:
        ctl.update(current, steps)
        fixed.update(current, steps)
        e = min(max(current / 6.0 - 1, -0.2), 0.2)
        value = value * (1 + e * steps / 100.0)
        assert abs(ctl.value - value) < 1e-15
    assert fixed.value == 0.1
    restored = fn.AdaptiveKLController(1.0, 6.0, 100.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        fn.AdaptiveKLController(0.1, 0.0, 100.0)


def test_advantage_normalisation():
    seqs = make_seqs(12)
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    out = fn.normalize_advantages(b["adv"], mask)
    close(out, ref_adv_norm(b["adv"].tolist(), flat_mask(seqs)), 1e-6)


def test_value_normalizer_sequence_and_exact_resume():
    rng = random.Random(13)
    batches = [
        ([f32(rng.gauss(3.0, 2.0)) for _ in range(n)], [rng.random() < 0.7 for _ in range(n)]) for n in (9, 14, 5, 11)
    ]
    vn = fn.ValueNormalizer(beta=0.9, eps=1e-5)
    ref = RefValueNorm(0.9, 1e-5)
    probe = torch.tensor([-40.0, -1.0, 0.0, 0.5, 3.0, 40.0])
    # Before any update: mean 0 and std sqrt(1e-2) (ReaL's floor).
    assert vn.mean_std() == (0.0, 0.1)
    close(vn.denormalize(probe), [ref.denormalize(x) for x in probe.tolist()], 1e-7)
    snapshot = None
    for i, (xs, ms) in enumerate(batches):
        vn.update(torch.tensor(xs), torch.tensor(ms))
        ref.update([x for x, m in zip(xs, ms, strict=True) if m])
        mu, sd = vn.mean_std()
        rmu, rsd = ref.mean_std()
        assert abs(mu - rmu) < 1e-12 and abs(sd - rsd) < 1e-12
        close(vn.normalize(probe), [ref.normalize(x) for x in probe.tolist()], 1e-7)
        close(vn.denormalize(probe), [ref.denormalize(x) for x in probe.tolist()], 1e-7)
        if i == 1:
            snapshot = dict(vn.state_dict())
    assert vn.normalize(probe).abs().max().item() == 5.0  # the clip is exercised
    resumed = fn.ValueNormalizer()
    resumed.load_state_dict(snapshot)
    for xs, ms in batches[2:]:
        resumed.update(torch.tensor(xs), torch.tensor(ms))
    assert resumed.state_dict() == vn.state_dict()  # bit-exact


def test_ppo_targets_against_reference():
    seqs = make_seqs(14, num_seqs=8)
    assert 0 < sum(s["no_eos"] for s in seqs) < len(seqs), "the fixture should mix bootstrapped and terminal ends"
    b = pack(seqs)
    kw = dict(
        kl_ctl=0.05,
        discount=0.95,
        gae_lambda=0.9,
        max_reward_clip=6.0,
        reward_output_scaling=2.0,
        reward_output_bias=-0.3,
    )
    vn = fn.ValueNormalizer(beta=0.8)
    vn.update(torch.tensor([0.5, 2.0, 4.0]))  # a non-trivial state before the step
    ref_vn = RefValueNorm(0.8, 1e-5)
    ref_vn.update([0.5, 2.0, 4.0])
    out = fn.ppo_targets(
        cu_seqlens=b["cu"],
        prompt_mask_T=b["prompt_mask"],
        logprobs_N=b["logp"],
        ref_logprobs_N=b["ref"],
        values_T=b["values"],
        raw_rewards_B=b["raw"],
        seq_no_eos_mask_B=b["no_eos"],
        value_normalizer=vn,
        **kw,
    )
    advs, rets, klrs, rws = [], [], [], []
    for s in seqs:
        klr, r = ref_rewards(s, 0.05, 2.0, -0.3, 6.0)
        V = [ref_vn.denormalize(v) for v in s["values"]]
        a, rt = ref_gae(r, V, s["no_eos"], 0.95, 0.9, gen_entries(s))
        advs += a
        rets += rt
        klrs += klr
        rws += r
    mask = flat_mask(seqs)
    close(out["kl_rewards"], klrs, 1e-6)
    close(out["rewards"], rws, 1e-6)
    close(out["returns"], rets, 1e-5)
    ref_vn.update([x for x, m in zip(rets, mask, strict=True) if m])
    close(out["critic_targets"], [ref_vn.normalize(x) if m else 0.0 for x, m in zip(rets, mask, strict=True)], 1e-5)
    close(out["advantages"], ref_adv_norm(advs, mask), 1e-5)
    assert out["action_mask"].tolist() == mask
    close(out["old_values"], [v for s in seqs for v in s["values"][:-1]], 0)
    assert abs(vn.mean_std()[0] - ref_vn.mean_std()[0]) < 1e-6  # returns are fp32 here
    # Without normalisers: raw advantages, and critic targets are the returns.
    plain = fn.ppo_targets(
        cu_seqlens=b["cu"],
        prompt_mask_T=b["prompt_mask"],
        logprobs_N=b["logp"],
        ref_logprobs_N=b["ref"],
        values_T=b["values"],
        raw_rewards_B=b["raw"],
        seq_no_eos_mask_B=b["no_eos"],
        adv_norm=False,
        **kw,
    )
    ref_plain = []
    for s in seqs:
        _, r = ref_rewards(s, 0.05, 2.0, -0.3, 6.0)
        ref_plain += ref_gae(r, s["values"], s["no_eos"], 0.95, 0.9, gen_entries(s))[0]
    close(plain["advantages"], ref_plain, 1e-5)
    assert torch.equal(plain["critic_targets"], plain["returns"])


def ref_actor_loss(lp: torch.Tensor, seqs: list[dict], eps_clip: float, num_tokens: float):
    """Scalar loop; returns (loss tensor, ratio sum, clip count, approx-kl sum)."""
    total, ratio_sum, clipped, kl_sum, j = 0.0, 0.0, 0, 0.0, 0
    for s in seqs:
        for k in range(s["L"] - 1):
            if k in gen_entries(s):
                ratio = torch.exp(lp[j] - s["old"][k])
                a = s["adv"][k]
                l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1 - eps_clip, 1 + eps_clip)
                total = total + torch.maximum(l1, l2)
                ratio_sum += ratio.item()
                clipped += int(l1.item() < l2.item())
                kl_sum += s["old"][k] - lp[j].item()
            j += 1
    return total / num_tokens, ratio_sum, clipped, kl_sum


def test_actor_loss_values_stats_grads():
    seqs = make_seqs(15)
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    n = float(mask.sum())
    lp = b["logp"].clone().requires_grad_(True)
    loss, st = fn.ppo_actor_loss(lp, b["old"], b["adv"], mask, eps_clip=0.2, num_tokens=n)
    lp_ref = b["logp"].double().clone().requires_grad_(True)
    ref, ratio_sum, clipped, kl_sum = ref_actor_loss(lp_ref, seqs, 0.2, n)
    close(loss.item(), ref.item(), 1e-6)
    assert 0 < clipped < n, "the fixture should clip some tokens and not others"
    assert st["clip_count"].item() == clipped and st["num_tokens"].item() == n
    close(st["importance_ratio_sum"].item(), ratio_sum, 1e-6)
    close(st["approx_kl_sum"].item(), kl_sum, 1e-6)
    close(st["loss_sum"].item(), ref.item() * n, 1e-6)
    loss.backward()
    ref.backward()
    assert torch.isfinite(lp.grad).all()
    close(lp.grad, lp_ref.grad, 1e-5)
    # Garbage on masked entries (e.g. prompt positions) must not reach the loss or the gradient.
    lp2 = torch.where(mask, b["logp"], 1e4).requires_grad_(True)
    loss2, _ = fn.ppo_actor_loss(lp2, b["old"], b["adv"], mask, eps_clip=0.2, num_tokens=n)
    loss2.backward()
    close(loss2.item(), loss.item(), 1e-7)
    assert torch.isfinite(lp2.grad).all() and (lp2.grad[~mask] == 0).all()


def test_early_stop_flag():
    seqs = make_seqs(16)
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    n = float(mask.sum())
    _, st = fn.ppo_actor_loss(b["logp"], b["old"], b["adv"], mask, eps_clip=0.2, num_tokens=n)
    red = fn.reduce_stats(st)
    assert not fn.ppo_early_stop(red, 5.0) and not fn.ppo_early_stop(red, None)
    _, hot = fn.ppo_actor_loss(b["old"] + 2.0, b["old"], b["adv"], mask, eps_clip=0.2, num_tokens=n)  # ρ = e² ≈ 7.4
    assert fn.ppo_early_stop(fn.reduce_stats(hot), 5.0)
    assert not fn.ppo_early_stop(fn.reduce_stats(hot), 8.0)


def test_critic_loss_values_stats_grads():
    seqs = make_seqs(17)
    for s in seqs:  # returns R in "adv", old values V_old in "values", new values in "new_values"
        s["new_values"] = [v + random.Random(len(s["tokens"])).uniform(-0.6, 0.6) for v in s["values"]]
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    n = float(mask.sum())
    new_v = fn.drop_last_per_seq(torch.tensor([v for s in seqs for v in s["new_values"]]), b["cu"])
    v = new_v.clone().requires_grad_(True)
    loss, st = fn.ppo_critic_loss(
        v, fn.drop_last_per_seq(b["values"], b["cu"]), b["adv"], mask, value_eps_clip=0.2, num_tokens=n
    )
    v_ref = new_v.double().clone().requires_grad_(True)
    total, clipped, j = 0.0, 0, 0
    for s in seqs:
        for k in range(s["L"] - 1):
            if k in gen_entries(s):
                old, ret = s["values"][k], s["adv"][k]
                l1 = 0.5 * (v_ref[j] - ret) ** 2
                l2 = 0.5 * (old + torch.clamp(v_ref[j] - old, -0.2, 0.2) - ret) ** 2
                total = total + torch.maximum(l1, l2)
                clipped += int(l2.item() > l1.item())
            j += 1
    ref = total / n
    close(loss.item(), ref.item(), 1e-6)
    assert 0 < clipped < n and st["clip_count"].item() == clipped
    close(st["loss_sum"].item(), ref.item() * n, 1e-6)
    loss.backward()
    ref.backward()
    close(v.grad, v_ref.grad, 1e-5)


# ---- preference and supervised losses -----------------------------------------------------------------


def test_pair_indices():
    ids = torch.tensor([3, 1, 3, 0, 1, 0])
    chosen = torch.tensor([False, True, True, False, False, True])
    c, r = fn.pair_indices(ids, chosen)
    assert c.tolist() == [5, 1, 2] and r.tolist() == [3, 4, 0]
    with pytest.raises(ValueError):
        fn.pair_indices(torch.tensor([0, 0, 1, 1]), torch.tensor([True, True, False, False]))
    assert [t.tolist() for t in fn.interleaved_pairs(6)] == [[0, 2, 4], [1, 3, 5]]


def test_dpo_loss_values_grads():
    seqs = make_seqs(18, num_seqs=8)
    b = pack(seqs)
    mask = fn.action_mask(b["prompt_mask"], b["cu"])
    rng = random.Random(19)
    order = list(range(8))
    rng.shuffle(order)
    pair_ids = torch.empty(8, dtype=torch.long)
    is_chosen = torch.empty(8, dtype=torch.bool)
    for p in range(4):
        pair_ids[order[2 * p]], pair_ids[order[2 * p + 1]] = p, p
        is_chosen[order[2 * p]], is_chosen[order[2 * p + 1]] = True, False
    ci, ri = fn.pair_indices(pair_ids, is_chosen)
    lp = b["logp"].clone().requires_grad_(True)
    pol = fn.sequence_logprobs(lp, mask, b["cu"])
    ref_s = fn.sequence_logprobs(b["ref"], mask, b["cu"])
    loss, st = fn.dpo_loss(pol, ref_s, ci, ri, beta=0.3, num_pairs=4)
    # Reference: token loops over answer tokens, one term per pair id.
    lp_ref = b["logp"].double().clone().requires_grad_(True)
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + s["L"] - 1)
    S = [sum(lp_ref[offsets[i] + k] for k in gen_entries(s)) for i, s in enumerate(seqs)]
    R = [sum(s["ref"][k] for k in gen_entries(s)) for s in seqs]
    total, margins = 0.0, []
    for p in range(4):
        c = order[2 * p]
        r = order[2 * p + 1]
        m = 0.3 * ((S[c] - R[c]) - (S[r] - R[r]))
        margins.append(m.item())
        total = total - torch.log(torch.sigmoid(m))
    ref = total / 4
    close(loss.item(), ref.item(), 1e-6)
    close(st["margin_sum"].item(), sum(margins), 1e-5)
    assert st["correct_count"].item() == sum(m > 0 for m in margins)
    loss.backward()
    ref.backward()
    close(lp.grad, lp_ref.grad, 1e-5)


def test_rw_loss_values_grads():
    seqs = make_seqs(20, num_seqs=6)
    b = pack(seqs)
    vals = b["values"].clone().requires_grad_(True)
    scores = fn.last_token_values(vals, b["cu"])
    ci, ri = fn.interleaved_pairs(6)
    w = torch.tensor([0.5, 0.5, 1.0])
    loss, st = fn.rw_loss(scores, ci, ri, num_pairs=2, pair_weights=w)
    v_ref = b["values"].double().clone().requires_grad_(True)
    ends = b["cu"][1:].tolist()
    total, correct = 0.0, 0
    for p in range(3):
        sp, sn = v_ref[ends[2 * p] - 1], v_ref[ends[2 * p + 1] - 1]
        total = total + w[p].item() * -torch.log(torch.sigmoid(sp - sn))
        correct += int(sp.item() > sn.item())
    ref = total / 2
    close(loss.item(), ref.item(), 1e-6)
    assert st["correct_count"].item() == correct
    loss.backward()
    ref.backward()
    close(vals.grad, v_ref.grad, 1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_sft_loss_matches_cross_entropy(chunk_rows):
    seqs = make_seqs(21, num_seqs=5, vocab=13)
    b = pack(seqs)
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(b["tokens"].numel(), 13, generator=g)
    x = logits.clone().requires_grad_(True)
    n = sum(len(gen_entries(s)) for s in seqs)
    loss, st = fn.sft_loss(x, b["tokens"], b["cu"], b["prompt_mask"], num_tokens=n, chunk_rows=chunk_rows)
    x_ref = logits.clone().requires_grad_(True)
    cu = b["cu"].tolist()
    total = 0.0
    for i, s in enumerate(seqs):
        P, L = s["P"], s["L"]
        total = total + F.cross_entropy(
            x_ref[cu[i] + P - 1 : cu[i] + L - 1], torch.tensor(s["tokens"][P:L]), reduction="sum"
        )
    ref = total / n
    close(loss.item(), ref.item(), 1e-6)
    assert st["num_tokens"].item() == n
    loss.backward()
    ref.backward()
    close(x.grad, x_ref.grad, 1e-5)


# ---- layout independence: dp ranks (threads) × micro-batches == one batch -----------------------------


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts)


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_ppo_layout_independence(num_ranks):
    seqs = make_seqs(30, num_seqs=9)
    kw = dict(kl_ctl=0.1, discount=0.97, gae_lambda=0.9, max_reward_clip=5.0, reward_output_scaling=1.5)

    def targets(part, all_reduce, vn):
        b = pack(part)
        return fn.ppo_targets(
            cu_seqlens=b["cu"],
            prompt_mask_T=b["prompt_mask"],
            logprobs_N=b["logp"],
            ref_logprobs_N=b["ref"],
            values_T=b["values"],
            raw_rewards_B=b["raw"],
            seq_no_eos_mask_B=b["no_eos"],
            value_normalizer=vn,
            all_reduce=all_reduce,
            **kw,
        )

    vn_single = fn.ValueNormalizer(beta=0.9)
    single = targets(seqs, None, vn_single)
    parts = split(seqs, num_ranks)
    vns = [fn.ValueNormalizer(beta=0.9) for _ in parts]
    outs = ThreadGroup(num_ranks).run(lambda r, ar: targets(parts[r], ar, vns[r]))
    for key in ("advantages", "returns", "critic_targets", "rewards", "action_mask"):
        close(_concat([o[key] for o in outs]), single[key], 1e-6)
    for vn in vns:
        assert vn.state_dict() == vns[0].state_dict()
        assert abs(vn.mean - vn_single.mean) < 1e-12 and abs(vn.mean_sq - vn_single.mean_sq) < 1e-12

    # Actor and critic losses: each rank's share in 2 micro-batches, normalised by the global token count.
    b_all = pack(seqs)
    adv_all = single["advantages"]
    n_global = float(single["action_mask"].sum())
    lp_leaf = b_all["logp"].clone().requires_grad_(True)
    v_leaf = fn.drop_last_per_seq(b_all["new_values"], b_all["cu"]).clone().requires_grad_(True)
    loss1, st1 = fn.ppo_actor_loss(
        lp_leaf, b_all["old"], adv_all, single["action_mask"], eps_clip=0.2, num_tokens=n_global
    )
    closs1, _ = fn.ppo_critic_loss(
        v_leaf,
        single["old_values"],
        single["critic_targets"],
        single["action_mask"],
        value_eps_clip=0.2,
        num_tokens=n_global,
    )
    (loss1 + closs1).backward()
    g_lp, g_v = lp_leaf.grad.clone(), v_leaf.grad.clone()
    lp_leaf.grad = v_leaf.grad = None

    offsets, o = [], 0
    for part in parts:
        n_part = sum(s["L"] - 1 for s in part)
        offsets.append((o, o + n_part))
        o += n_part

    def rank_losses(r, all_reduce):
        lo, hi = offsets[r]
        out = outs[r]
        n = fn.global_count(out["action_mask"], all_reduce)
        assert n.item() == n_global
        mbs = split(list(range(len(parts[r]))), 2)
        losses, stats = [], []
        sub_off = 0
        for mb in mbs:
            n_mb = sum(parts[r][i]["L"] - 1 for i in mb)
            sl = slice(sub_off, sub_off + n_mb)
            g_sl = slice(lo + sub_off, lo + sub_off + n_mb)
            la, sa = fn.ppo_actor_loss(
                lp_leaf[g_sl],
                b_all["old"][g_sl],
                out["advantages"][sl],
                out["action_mask"][sl],
                eps_clip=0.2,
                num_tokens=n,
            )
            lc, _ = fn.ppo_critic_loss(
                v_leaf[g_sl],
                out["old_values"][sl],
                out["critic_targets"][sl],
                out["action_mask"][sl],
                value_eps_clip=0.2,
                num_tokens=n,
            )
            losses.append(la + lc)
            stats.append(sa)
            sub_off += n_mb
        assert sub_off == hi - lo
        return sum(losses), fn.reduce_stats(stats, all_reduce)

    res = ThreadGroup(num_ranks).run(rank_losses)
    total = sum(loss for loss, _ in res)
    close(total.item(), (loss1 + closs1).item(), 1e-6)
    total.backward()
    close(lp_leaf.grad, g_lp, 1e-6)
    close(v_leaf.grad, g_v, 1e-6)
    # The early-stop decision uses the reduced stats: identical on every rank and equal to one batch's.
    single_red = fn.reduce_stats(st1)
    for _, red in res:
        for k in single_red:
            close(red[k], single_red[k], 1e-9)
        assert fn.ppo_early_stop(red, 1.05) == fn.ppo_early_stop(single_red, 1.05)
    # Global mean per-sequence KL for the adaptive controller, too.
    mask_all = single["action_mask"]
    kl_single = fn.mean_sequence_kl(b_all["logp"], b_all["ref"], mask_all, b_all["cu"])

    def rank_kl(r, all_reduce):
        b = pack(parts[r])
        return fn.mean_sequence_kl(b["logp"], b["ref"], outs[r]["action_mask"], b["cu"], all_reduce)

    for kl, n in ThreadGroup(num_ranks).run(rank_kl):
        assert n == kl_single[1] and abs(kl - kl_single[0]) < 1e-9


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_preference_and_sft_layout_independence(num_ranks):
    seqs = make_seqs(40, num_seqs=12, vocab=9)
    b_all = pack(seqs)
    T = b_all["tokens"].numel()
    g = torch.Generator().manual_seed(41)
    logits = torch.randn(T, 9, generator=g)
    ci_all, ri_all = fn.interleaved_pairs(12)

    def losses(b, x, v, ci, ri, n_pairs, n_tok):
        mask = fn.action_mask(b["prompt_mask"], b["cu"])
        lp = fn.gather_logprobs_chunked(x, b["tokens"], b["cu"], chunk_rows=5)
        pol = fn.sequence_logprobs(lp, mask, b["cu"])
        ref = fn.sequence_logprobs(b["ref"], mask, b["cu"])
        ld, _ = fn.dpo_loss(pol, ref, ci, ri, beta=0.2, num_pairs=n_pairs)
        lr, _ = fn.rw_loss(fn.last_token_values(v, b["cu"]), ci, ri, num_pairs=n_pairs)
        ls, _ = fn.sft_loss(x, b["tokens"], b["cu"], b["prompt_mask"], num_tokens=n_tok)
        return ld + lr + ls

    x1 = logits.clone().requires_grad_(True)
    v1 = b_all["values"].clone().requires_grad_(True)
    n_tok = sum(len(gen_entries(s)) for s in seqs)
    single = losses(b_all, x1, v1, ci_all, ri_all, 6, n_tok)
    single.backward()

    pairs = [seqs[2 * p : 2 * p + 2] for p in range(6)]
    parts = [[s for pr in chunk for s in pr] for chunk in split(pairs, num_ranks)]
    x2 = logits.clone().requires_grad_(True)
    v2 = b_all["values"].clone().requires_grad_(True)
    tok_off = [0]
    for part in parts:
        tok_off.append(tok_off[-1] + sum(s["L"] for s in part))

    def rank(r, all_reduce):
        b = pack(parts[r])
        mask = fn.action_mask(b["prompt_mask"], b["cu"])
        n_pairs = all_reduce(torch.tensor(len(parts[r]) / 2, dtype=torch.float64))
        n = fn.global_count(mask, all_reduce)
        ci, ri = fn.interleaved_pairs(len(parts[r]))
        sl = slice(tok_off[r], tok_off[r + 1])
        return losses(b, x2[sl], v2[sl], ci, ri, n_pairs, n)

    total = sum(ThreadGroup(num_ranks).run(rank))
    close(total.item(), single.item(), 1e-6)
    total.backward()
    close(x2.grad, x1.grad, 1e-6)
    close(v2.grad, v1.grad, 1e-6)
    assert torch.isfinite(x2.grad).all()
