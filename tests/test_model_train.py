"""Training pieces: LR schedules, log-probs, the SFT loss's layout independence, AdamW with fp32 masters."""

from __future__ import annotations

import math

import pytest
import torch

from reallm.errors import UserError
from reallm.model import (
    MixedPrecisionAdamW,
    OptimizerSettings,
    Transformer,
    load_hf_model,
    lr_at,
    packed_logprobs,
    sft_loss,
    sft_micro_batch,
    train_step,
)
from reallm.model.losses import target_logprobs
from reallm.model.train import evaluate, forward_backward
from reallm.spec import ModelSpec

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """The tiny checkpoints: the shared conftest fixture when there is one, else built here."""
    try:
        return request.getfixturevalue("tiny_assets")
    except pytest.FixtureLookupError:
        from reallm.assets import make_tiny_assets

        return make_tiny_assets(str(tmp_path_factory.getbasetemp() / "tiny_assets"))


def _seqs(n: int, vocab: int = 384, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    seqs = [torch.randint(4, vocab, (L,), generator=g).tolist() for L in lengths]
    prompt_lens = [max(1, L // 3) for L in lengths]
    return seqs, prompt_lens


# -- LR schedules -----------------------------------------------------------------------------------------


def test_lr_schedule_values():
    s = OptimizerSettings(lr=1.0, min_lr_ratio=0.1, warmup_steps_proportion=0.1, lr_scheduler_type="cosine")
    # 100 updates, 10 warm-up: 0.1, 0.2, ... 1.0, then cosine from 1.0 towards 0.1 over 90 updates.
    assert [round(lr_at(i, 100, s), 6) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(10, 100, s) == pytest.approx(1.0)
    assert lr_at(55, 100, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(99, 100, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    lin = OptimizerSettings(lr=2.0, min_lr_ratio=0.0, warmup_steps_proportion=0.0, lr_scheduler_type="linear")
    assert [lr_at(i, 4, lin) for i in range(4)] == [2.0, 1.5, 1.0, 0.5]
    const = OptimizerSettings(lr=3.0, warmup_steps_proportion=0.5, lr_scheduler_type="constant")
    assert [lr_at(i, 4, const) for i in range(4)] == [1.5, 3.0, 3.0, 3.0]
    with pytest.raises(UserError, match="lr_scheduler_type"):
        OptimizerSettings(lr_scheduler_type="step")


def test_optimizer_settings_from_the_experiment_config():
    from reallm.config.schema import LRScheduler, OptimizerConfig

    s = OptimizerSettings.from_config(OptimizerConfig(lr=2e-5, lr_scheduler_type=LRScheduler.linear))
    assert (s.lr, s.weight_decay, s.beta1, s.beta2, s.eps, s.lr_scheduler_type) == (2e-5, 0.05, 0.9, 0.95, 1e-5,
                                                                                     "linear")


# -- log-probs and losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,masked", [(1.0, False), (0.7, True)])
def test_chunked_logprobs_equal_log_softmax_with_gradients(temperature, masked):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 17, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randint(0, 17, (23,), generator=g)
    mask = (torch.rand(23, 17, generator=g) < 0.3) if masked else None
    if mask is not None:
        mask[torch.arange(23), target] = False
    w = torch.randn(23, generator=g, dtype=torch.float64)
    ours = target_logprobs(logits, target, temperature=temperature, logits_mask_NV=mask, chunk_rows=5)
    (ours.double() * w).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    z = logits / temperature
    if mask is not None:
        z = z.masked_fill(mask, float("-inf"))
    ref = torch.log_softmax(z, -1).gather(-1, target[:, None]).squeeze(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=0)


def test_packed_logprobs_are_shifted_within_sequences():
    logits = torch.randn(7, 5)
    tokens = torch.tensor([1, 2, 3, 4, 0, 1, 2])
    cu = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    lp = packed_logprobs(logits, tokens, cu)
    full = torch.log_softmax(logits, -1)
    expected = [full[0, 2], full[1, 3], 0.0, 0.0, full[4, 1], full[5, 2], 0.0]
    torch.testing.assert_close(lp, torch.tensor([float(x) for x in expected]))


def test_sft_gradient_does_not_depend_on_the_micro_batch_split(tiny):
    seqs, plens = _seqs(6)
    whole = sft_micro_batch(seqs, plens)
    n = int(whole["num_answer_tokens_global"])
    halves = [sft_micro_batch(seqs[:2], plens[:2], n), sft_micro_batch(seqs[2:], plens[2:], n)]
    grads, losses = [], []
    for mbs in ([whole], halves):
        model = load_hf_model(tiny["llama"])
        losses.append(forward_backward(model, mbs, sft_loss)["loss"])
        grads.append({k: p.grad.clone() for k, p in model.hf_named_parameters()})
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_backward(tiny):
    seqs, plens = _seqs(6, seed=2)
    mb = sft_micro_batch(seqs, plens)
    grads = []
    for ckpt in (False, True):
        model = load_hf_model(tiny["llama"])
        model.gradient_checkpointing = ckpt
        forward_backward(model, [mb], sft_loss)
        grads.append({k: p.grad.clone() for k, p in model.hf_named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


# -- optimizer --------------------------------------------------------------------------------------------


def test_training_a_tiny_model_lowers_the_loss(tiny):
    model = load_hf_model(tiny["qwen2"])
    model.gradient_checkpointing = True
    seqs, plens = _seqs(8, seed=1)
    mbs = [sft_micro_batch(seqs[:4], plens[:4], None), sft_micro_batch(seqs[4:], plens[4:], None)]
    total = sum(int(m["num_answer_tokens_global"]) for m in mbs)
    for m in mbs:
        m["num_answer_tokens_global"] = torch.tensor(float(total))
    opt = MixedPrecisionAdamW(model.named_parameters(), OptimizerSettings(lr=3e-3, warmup_steps_proportion=0.2,
                                                                          gradient_clipping=1.0), total_steps=10)
    before = evaluate(model, mbs, sft_loss)["loss"]
    history = [train_step(model, opt, mbs, sft_loss) for _ in range(10)]
    after = evaluate(model, mbs, sft_loss)["loss"]
    assert after < 0.7 * before
    assert history[0]["lr"] == pytest.approx(1.5e-3) and history[2]["lr"] == pytest.approx(3e-3)
    assert all(h["grad_norm"] > 0 and h["skipped"] == 0 for h in history)
    assert opt.num_updates == 10


def _toy(dtype=torch.float32) -> Transformer:
    spec = ModelSpec("llama", num_layers=1, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1,
                     head_dim=8, vocab_size=32)
    m = Transformer(spec, dtype=dtype)
    m.init_weights(seed=0, std=0.1)
    return m


def test_clipping_scales_to_the_max_norm_and_decay_skips_vectors():
    model = _toy()
    s = OptimizerSettings(lr=1e-3, weight_decay=0.5, gradient_clipping=0.01, warmup_steps_proportion=0.0,
                          lr_scheduler_type="constant")
    opt = MixedPrecisionAdamW(model.named_parameters(), s, total_steps=5)
    seqs, plens = _seqs(3, vocab=32)
    forward_backward(model, [sft_micro_batch(seqs, plens)], sft_loss)
    raw = math.sqrt(sum(float(g.pow(2).sum()) for g in opt.master_grads().values()))
    clip_seen = {}
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        clip_seen["norm"] = math.sqrt(sum(float(p.grad.pow(2).sum()) for grp in self.param_groups
                                          for p in grp["params"] if p.grad is not None))
        return orig(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        stats = opt.step()
    finally:
        torch.optim.AdamW.step = orig
    assert stats["grad_norm"] == pytest.approx(raw, rel=1e-5) and raw > 0.01
    assert clip_seen["norm"] == pytest.approx(0.01, rel=1e-4)
    groups = opt.optimizer.param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.5
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_bf16_parameters_get_fp32_masters_and_fp32_accumulation():
    model = _toy(torch.bfloat16)
    s = OptimizerSettings(lr=1e-2, warmup_steps_proportion=0.0, lr_scheduler_type="constant", gradient_clipping=0)
    opt = MixedPrecisionAdamW(model.named_parameters(), s, total_steps=3)
    assert all(m.dtype == torch.float32 for m in opt.masters.values())
    seqs, plens = _seqs(4, vocab=32, seed=2)
    n = int(sft_micro_batch(seqs, plens)["num_answer_tokens_global"])
    mbs = [sft_micro_batch(seqs[:2], plens[:2], n), sft_micro_batch(seqs[2:], plens[2:], n)]
    forward_backward(model, mbs[:1], sft_loss)
    first = {k: g.clone() for k, g in opt.master_grads().items()}
    forward_backward(model, mbs[1:], sft_loss)
    assert all(p.grad is None for p in model.parameters())  # moved into the fp32 masters by the hook
    second = opt.master_grads()
    assert all(g.dtype == torch.float32 for g in second.values())
    assert any(not torch.equal(first[k], second[k]) for k in first)
    before = {k: m.clone() for k, m in opt.masters.items()}
    opt.step()
    for k, p in opt.params.items():
        assert not torch.equal(opt.masters[k], before[k])
        assert torch.equal(p.detach(), opt.masters[k].to(torch.bfloat16))


def test_optimizer_state_round_trip_resumes_exactly():
    seqs, plens = _seqs(3, vocab=32, seed=3)
    mb = sft_micro_batch(seqs, plens)
    s = OptimizerSettings(lr=1e-2, warmup_steps_proportion=0.0)
    a = _toy()
    opt_a = MixedPrecisionAdamW(a.named_parameters(), s, total_steps=4)
    train_step(a, opt_a, [mb], sft_loss)
    state = opt_a.state_dict()
    b = _toy()
    b.load_state_dict(a.state_dict())
    opt_b = MixedPrecisionAdamW(b.named_parameters(), s, total_steps=4)
    opt_b.load_state_dict(state)
    assert opt_b.lr == opt_a.lr
    train_step(a, opt_a, [mb], sft_loss)
    train_step(b, opt_b, [mb], sft_loss)
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), k


def test_non_finite_gradients_skip_the_update():
    model = _toy()
    opt = MixedPrecisionAdamW(model.named_parameters(), OptimizerSettings(), total_steps=2)
    before = {k: p.clone() for k, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    stats = opt.step()
    assert stats["skipped"] == 1.0 and opt.num_updates == 0
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
