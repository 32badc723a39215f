"""Model parallelism on CPU with real gloo processes: every layout equals the single-process model and transformers.

One launch of 8 forked workers (``tests/dist_harness.py``) runs every case below in turn; a case's ranks
build their part of the model from the HF checkpoint (only their slices) and compare *their own* shards
with references the parent computed before forking:

* logits (each rank's vocabulary columns) and values equal transformers / the plain model (1e-4);
* vocab-parallel log-probs with a temperature and a logits mask equal ``functional.gather_logprobs`` (1e-4);
* one SFT (or value-loss) step: loss, gradients (after the tp / tied / dp reductions) and the updated
  parameters equal the single-process ``MixedPrecisionAdamW`` step (1e-5);
* greedy generation equals transformers' greedy; sampling equals single-process ``generate`` (same keys);
* save under one layout, load under another (exactly the file's tensors) and in transformers;
* the graphed inference path (``reallm.model.graphs``, uncaptured on CPU) on a pipeline and a critic.

Layouts: (dp, tp, pp) in {1,2}^3, (1,4,1) (tp > kv heads), (1,1,4) (tied, with and without a {first, last}
group), tp = 3 on the 9-head model, sequence parallel with token and vocabulary padding, ZeRO-1, optimizer
offload, a critic, and device meshes listed out of order.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from tests.dist_harness import run_workers

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SETTINGS_KW = dict(lr=2e-3, weight_decay=0.05, beta1=0.9, beta2=0.95, eps=1e-5, lr_scheduler_type="constant",
                   warmup_steps_proportion=0.0, gradient_clipping=1.0)
TOTAL_STEPS = 10
LENGTHS = (5, 11, 3, 14, 7, 9, 4, 12)
PROMPTS = ((1, 17, 33, 9), (1, 250, 7), (1, 5, 6, 7, 8, 9, 10), (1, 99))
EOS, PAD = 2, 3
GREEDY_NEW = 6
SAMPLE_KW = dict(max_new_tokens=6, greedy=False, temperature=0.8, top_k=50, top_p=0.9, return_logits_mask=True)
SAMPLE_KEYS = dict(seed=7, step=3, seq_ids=(10, 11, 12, 13))


@dataclass(frozen=True)
class Case:
    model: str  # reference key
    dp: int = 1
    tp: int = 1
    pp: int = 1
    sp: bool = False
    mbs: int = 2
    checks: tuple[str, ...] = ("logits", "train")
    devices: Optional[tuple[int, ...]] = None
    zero1: bool = False
    offload: bool = False
    no_tied_group: bool = False
    checkpointing: bool = False
    save: Optional[str] = None
    load: Optional[str] = None

    @property
    def name(self) -> str:
        extra = "".join(f"+{k}" for k in ("sp", "zero1", "offload", "no_tied_group", "checkpointing")
                        if getattr(self, k))
        return f"{self.model}:d{self.dp}p{self.pp}m{self.tp}{extra}" + (f"<{self.load}" if self.load else "")


CASES = (
    Case("llama", checks=("logits", "logprobs", "greedy", "eos", "sample", "train")),
    Case("qwen2", dp=2, checks=("logits", "greedy", "train")),
    Case("llama", tp=2, checks=("logits", "logprobs", "greedy", "sample", "train")),
    Case("mistral", pp=2, mbs=3, checks=("logits", "graphed", "greedy", "eos", "sample", "train")),
    Case("qwen2", dp=2, tp=2, checks=("logits", "greedy", "train")),
    Case("llama_tied", dp=2, pp=2, mbs=3, checks=("logits", "greedy", "train")),
    Case("v383", tp=2, pp=2, mbs=3, checks=("logits", "logprobs", "greedy", "sample", "train")),
    Case("llama", dp=2, tp=2, pp=2, checks=("logits", "greedy", "eos", "train"), save="llama_d2p2m2"),
    Case("qwen2", dp=2, tp=2, pp=2, sp=True, mbs=3, checkpointing=True, checks=("logits", "train")),
    Case("llama", tp=4, checks=("logits", "greedy", "train")),
    Case("llama", tp=4, sp=True, checks=("loaded", "logits"), load="llama_d2p2m2"),
    Case("llama", tp=2, pp=2, devices=(3, 2, 1, 0), checks=("loaded", "greedy"), load="llama_d2p2m2"),
    Case("llama_tied", pp=4, mbs=5, checks=("logits", "greedy", "train"), save="tied_p4"),
    Case("llama_tied", pp=4, mbs=2, no_tied_group=True, checks=("train",)),
    Case("llama_tied", tp=2, checks=("loaded",), load="tied_p4"),
    Case("llama_9h", tp=3, checks=("logits", "logprobs", "greedy", "train")),
    Case("llama_9h", tp=3, pp=2, sp=True, checks=("logits", "train")),
    Case("v383", tp=4, sp=True, checks=("logits", "logprobs", "greedy", "sample", "train")),
    Case("llama", dp=2, tp=2, sp=True, zero1=True, devices=(3, 2, 1, 0), checks=("train",)),
    Case("mistral", dp=2, pp=2, zero1=True, offload=True, checks=("offload", "train")),
    Case("critic", tp=2, pp=2, sp=True, mbs=3, checks=("logits", "train"), save="critic_p2m2"),
    Case("critic", dp=2, checks=("loaded", "logits", "graphed"), load="critic_p2m2"),
)


# -- references (parent process) --------------------------------------------------------------------------


@dataclass
class Ref:
    path: str
    critic: bool
    vocab_size: int
    tied: bool
    seqs: list
    prompt_lens: list
    targets: list  # critic: per-sequence value targets
    logits: torch.Tensor  # [T, V] transformers (actor) / plain-model values [T] (critic)
    loss: float
    grad_norm: float
    grads: dict
    updated: dict
    post_logits: torch.Tensor  # after the step (plain model)
    greedy: Optional[list] = None
    greedy_post: Optional[list] = None  # after the step (plain model, single-process generate)
    eos_ids: tuple = ()  # two tokens greedy emits first, as EOS: some sequences and micro-batches end early
    greedy_eos: Optional[object] = None
    sample: Optional[object] = None
    logprob_mask: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None


def _seqs(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    targets = [torch.randn(n, generator=g).tolist() for n in LENGTHS]
    return seqs, [max(1, n // 3) for n in LENGTHS], targets


def _sft_ref_loss(logits, mb):
    from reallm.model.losses import sft_loss

    return sft_loss(logits, mb)


def value_loss(values, mb):
    w = mb["value_weight"]
    loss = ((values.float() - mb["value_target"]) ** 2 * w).sum() / mb["num_values_global"]
    return loss, {"num_values": float(w.sum())}


def micro_batch(ref: Ref, idx: list[int]) -> dict:
    from reallm.model.transformer import pack_sequences

    seqs = [ref.seqs[i] for i in idx]
    tokens, cu = pack_sequences(seqs)
    pm = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for start, i in zip(cu[:-1].tolist(), idx):
        pm[start:start + ref.prompt_lens[i]] = True
    n_answer = sum(len(ref.seqs[i]) - ref.prompt_lens[i] for i in range(len(ref.seqs)))
    mb = {"tokens": tokens, "cu_seqlens": cu, "prompt_mask": pm,
          "num_answer_tokens_global": torch.tensor(float(n_answer))}
    if ref.critic:
        mb["value_target"] = torch.tensor([x for i in idx for x in ref.targets[i]])
        mb["value_weight"] = (~pm).float()
        mb["num_values_global"] = torch.tensor(float(n_answer))
    if ref.logprob_mask is not None:
        rows = _rows_of(ref, idx)
        mb["logits_mask"] = ref.logprob_mask[rows]
    return mb


def _rows_of(ref: Ref, idx: list[int]) -> torch.Tensor:
    starts = [0]
    for s in ref.seqs:
        starts.append(starts[-1] + len(s))
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx])


def build_ref(path: str, critic: bool = False) -> Ref:
    from reallm.algorithms.functional import gather_logprobs
    from reallm.model import GenerationConfig, MixedPrecisionAdamW, OptimizerSettings, load_hf_model
    from reallm.model.generate import generate
    from reallm.model.train import forward_backward
    from reallm.spec import load_hf_config

    cfg = load_hf_config(path)
    V = cfg["vocab_size"]
    seqs, prompt_lens, targets = _seqs(min(V, 383), 0)
    plain = load_hf_model(path, is_critic=critic, critic_init_seed=1)
    ref = Ref(path, critic, V, bool(cfg.get("tie_word_embeddings")) and not critic, seqs, prompt_lens, targets,
              None, 0.0, 0.0, {}, {}, None)
    everything = micro_batch(ref, list(range(len(seqs))))
    with torch.no_grad():
        if critic:
            ref.logits = plain(everything["tokens"], everything["cu_seqlens"])
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            ref.logits = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
            ours = plain(everything["tokens"], everything["cu_seqlens"])
            assert (ours - ref.logits).abs().max() < 1e-4
            ref.greedy = []
            for p in PROMPTS:
                out = hf.generate(torch.tensor([p]), max_new_tokens=GREEDY_NEW, do_sample=False, eos_token_id=EOS,
                                  pad_token_id=PAD)
                ref.greedy.append(out[0, len(p):].tolist())
            ref.sample = generate(plain, PROMPTS, GenerationConfig(**SAMPLE_KW), eos_token_id=EOS, pad_token_id=PAD,
                                  **SAMPLE_KEYS)
            ref.eos_ids = (ref.greedy[0][0], ref.greedy[1][2])
            ref.greedy_eos = generate(plain, PROMPTS, GenerationConfig(max_new_tokens=GREEDY_NEW, greedy=True),
                                      eos_token_id=list(ref.eos_ids), pad_token_id=PAD)
            g = torch.Generator().manual_seed(5)
            mask = torch.rand(ref.logits.shape, generator=g) < 0.3
            tok = everything["tokens"]
            mask[torch.arange(len(tok) - 1), tok[1:]] = False  # the target itself is never removed
            ref.logprob_mask = mask
            ref.logprobs = gather_logprobs(ref.logits, tok, everything["cu_seqlens"], temperature=0.7,
                                           logits_mask_TV=mask)
    opt = MixedPrecisionAdamW(plain.hf_named_parameters(), OptimizerSettings(**SETTINGS_KW), TOTAL_STEPS)
    stats = forward_backward(plain, [everything], value_loss if critic else _sft_ref_loss)
    ref.loss = stats["loss"]
    ref.grads = {n: g.detach().clone() for n, g in opt.master_grads().items()}
    ref.grad_norm = opt.step()["grad_norm"]
    ref.updated = {n: p.detach().clone() for n, p in plain.hf_named_parameters()}
    with torch.no_grad():
        ref.post_logits = plain(everything["tokens"], everything["cu_seqlens"])
    if not critic:
        ref.greedy_post = generate(plain, PROMPTS, GenerationConfig(max_new_tokens=GREEDY_NEW, greedy=True),
                                   eos_token_id=EOS, pad_token_id=PAD).sequences()
    return ref


@pytest.fixture(scope="module")
def refs(request, tmp_path_factory):
    try:
        assets = request.getfixturevalue("tiny_assets")
    except pytest.FixtureLookupError:
        from reallm.assets import make_tiny_assets

        assets = make_tiny_assets(str(tmp_path_factory.getbasetemp() / "tiny_assets"))
    from reallm.assets.checkpoints import TinyModel, write_checkpoint

    # A vocabulary no tp degree divides (383 is prime), tied: padding rows in the embedding and the head.
    v383 = str(tmp_path_factory.mktemp("v383"))
    write_checkpoint(TinyModel("v383", "llama", 4, 64, 128, 4, 2, tie_word_embeddings=True, rms_norm_eps=1e-5),
                     v383, seed=3, vocab_size=383, bos_id=1, eos_id=EOS, pad_id=PAD, max_position_embeddings=256)
    paths = {k: assets[k] for k in ("llama", "qwen2", "mistral", "llama_tied", "llama_9h")}
    paths["v383"] = v383
    out = {k: build_ref(p) for k, p in paths.items()}
    out["critic"] = build_ref(assets["qwen2"], critic=True)
    return out


# -- the worker suite ---------------------------------------------------------------------------------------


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> float:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:g}"
    return err


def _dp_share(ref: Ref, case: Case, dp_rank: int) -> list[list[int]]:
    n = len(ref.seqs)
    mine = list(range(dp_rank * n // case.dp, (dp_rank + 1) * n // case.dp))
    k = min(case.mbs, len(mine))
    return [mine[i * len(mine) // k:(i + 1) * len(mine) // k] for i in range(k)]


def _check_params(pm, want: dict, what: str, exact_file: Optional[str] = None) -> float:
    worst = 0.0
    f = None
    if exact_file is not None:
        from safetensors import safe_open

        f = safe_open(os.path.join(exact_file, "model.safetensors"), framework="pt")
    for s in pm.shards.shards:
        local = pm.local_tensor(s.name, s.tied_copy)
        real = local[s.local_slices]
        worst = max(worst, _close(real, want[s.name][s.full_slices], 1e-5, f"{what} {s.name}"))
        if real.shape != local.shape:
            assert not local[real.shape[0]:].any(), f"{what} {s.name}: vocabulary padding rows are not zero"
        if f is not None:
            assert torch.equal(real, f.get_slice(s.name)[s.full_slices]), f"{s.name} differs from the saved file"
    return worst


def _run_case(case: Case, rank: int, cache, refs: dict, tmp: str) -> list[tuple[str, str, float]]:
    from reallm.model import GenerationConfig, OptimizerSettings
    from reallm.parallel import ParallelModel
    from reallm.parallel.vocab import sft_loss
    from reallm.placement import Placement

    n = case.dp * case.tp * case.pp
    pl = Placement(case.devices or tuple(range(n)), dp=case.dp, tp=case.tp, pp=case.pp,
                   sequence_parallel=case.sp, num_micro_batches=case.mbs)
    cache.create_for(pl)
    if rank not in pl.devices:
        return []
    groups = cache.groups_for(pl, rank)
    if case.no_tied_group:
        groups = dataclasses.replace(groups, tied=None)
    ref: Ref = refs[case.model]
    path = ref.path if case.load is None else os.path.join(tmp, case.load)
    train = "train" in case.checks
    pm = ParallelModel.build(path, groups, is_critic=ref.critic,
                             optimizer=OptimizerSettings(**SETTINGS_KW) if train else None,
                             total_steps=TOTAL_STEPS, zero1=case.zero1, offload_optimizer=case.offload,
                             bucket_numel=4096, gradient_checkpointing=case.checkpointing)
    shares = _dp_share(ref, case, groups.coord.dp)
    mbs = [micro_batch(ref, idx) for idx in shares]
    rows = [_rows_of(ref, idx) for idx in shares]
    want_logits = ref.post_logits if case.load else ref.logits
    out: list[tuple[str, str, float]] = []

    def record(check: str, err: float) -> None:
        out.append((case.name, check, err))

    def logits_error(res) -> float:
        err = 0.0
        for r, got in zip(rows, res):
            want = want_logits[r]
            if ref.critic:
                err = max(err, _close(got, want, 1e-4, f"{case.name} values"))
                continue
            # (inference hands out hidden states and the head shard: the logits made here, as log-probs make
            # them a chunk at a time)
            assert got.logits is None and got.hidden is not None
            logits = got.local_logits()
            a, W = got.vocab_start, logits.shape[1]
            real = max(0, min(W, ref.vocab_size - a))
            err = max(err, _close(logits[:, :real], want[:, a:a + real], 1e-4, f"{case.name} logits"))
            assert not logits[:, real:].any(), "padded vocabulary columns must give zero logits"
        return err

    for check in case.checks:
        if check == "logits":
            res = pm.forward(mbs)
            if res is not None:
                record(check, logits_error(res))
        elif check == "graphed":
            # The graphed inference path's padded static buffers (uncaptured on CPU), stage inputs included:
            # the first pass meets each bucket once (eager), the second replays.
            pm.use_inference_graphs(capture=False)
            for _ in range(2):
                res = pm.forward(mbs)
            if res is not None:
                record(check, logits_error(res))
            pm.graphs = None
        elif check == "logprobs":
            res = pm.logprobs(mbs, temperature=0.7, logits_mask_key="logits_mask")
            if res is None:
                continue

            want_all, offs, err = ref.logprobs, [0], 0.0
            for s in ref.seqs:
                offs.append(offs[-1] + len(s) - 1)
            for idx, got in zip(shares, res):
                want = torch.cat([want_all[offs[i]:offs[i + 1]] for i in idx])
                err = max(err, _close(got, want, 1e-4, f"{case.name} log-probs"))
            record(check, err)
        elif check == "greedy":
            gen = pm.generate(PROMPTS, GenerationConfig(max_new_tokens=GREEDY_NEW, greedy=True), eos_token_id=EOS,
                              pad_token_id=PAD, num_micro_batches=3)
            if gen is not None:
                want = ref.greedy_post if case.load else ref.greedy
                assert gen.sequences() == want, f"{case.name}: greedy {gen.sequences()} != {want}"
                record(check, 0.0)
        elif check == "eos":
            gen = pm.generate(PROMPTS, GenerationConfig(max_new_tokens=GREEDY_NEW, greedy=True),
                              eos_token_id=list(ref.eos_ids), pad_token_id=PAD, num_micro_batches=3)
            if gen is not None:
                w = ref.greedy_eos
                assert gen.sequences() == w.sequences(), f"{case.name}: {gen.sequences()} != {w.sequences()}"
                assert torch.equal(gen.tokens_BN, w.tokens_BN) and torch.equal(gen.no_eos_B, w.no_eos_B)
                assert min(len(x) for x in w.sequences()) < GREEDY_NEW, "no sequence ended early"
                record(check, _close(gen.logprobs_BN, w.logprobs_BN, 1e-4, f"{case.name} eos log-probs"))
        elif check == "sample":
            gen = pm.generate(PROMPTS, GenerationConfig(**SAMPLE_KW), eos_token_id=EOS, pad_token_id=PAD,
                              **SAMPLE_KEYS)
            if gen is not None:
                w = ref.sample
                assert gen.sequences() == w.sequences(), f"{case.name}: sampled {gen.sequences()} != {w.sequences()}"
                assert torch.equal(gen.lengths_B, w.lengths_B) and torch.equal(gen.no_eos_B, w.no_eos_B)
                assert torch.equal(gen.logits_mask_BNV, w.logits_mask_BNV), f"{case.name}: logits masks differ"
                record(check, _close(gen.logprobs_BN, w.logprobs_BN, 1e-4, f"{case.name} sampled log-probs"))
        elif check == "offload":
            before = pm.flat_parameters().clone()
            pm.offload()
            assert pm.flat.untyped_storage().nbytes() == 0 and pm.optimizer.grads.untyped_storage().nbytes() == 0
            pm.reload()
            assert torch.equal(pm.flat_parameters(), before)
            record(check, 0.0)
        elif check == "train":
            loss_fn = value_loss if ref.critic else sft_loss
            if case.zero1:
                stats = pm.train_step(mbs, loss_fn)
            else:
                pm.optimizer.zero_grad()
                local = pm.forward_backward(mbs, loss_fn)
                pm.reduce_gradients()
                err = 0.0
                for s in pm.shards.shards:
                    g = pm.local_grad(s.name, s.tied_copy)
                    err = max(err, _close(g[s.local_slices], ref.grads[s.name][s.full_slices], 1e-5,
                                          f"{case.name} grad {s.name}{' (tied copy)' if s.tied_copy else ''}"))
                record("grads", err)
                stats = {**pm.gather_stats(local), **pm.optimizer_step()}
            record("loss", _close(torch.tensor(stats["loss"]), torch.tensor(ref.loss), 1e-5, f"{case.name} loss"))
            _close(torch.tensor(stats["grad_norm"]), torch.tensor(ref.grad_norm), 1e-5 * max(1.0, ref.grad_norm),
                   f"{case.name} grad norm")
            record("updated", _check_params(pm, ref.updated, f"{case.name} updated"))
            if case.save:
                pm.save_hf(os.path.join(tmp, case.save))
        elif check == "loaded":
            record(check, _check_params(pm, ref.updated, f"{case.name} loaded", exact_file=path))
            # The flat buffer is the layout's convention exactly (what reallocation reads and writes).
            from safetensors.torch import load_file

            from reallm.layout.shards import cut_flat

            full = {k: v.numpy() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
            shards, flat = pm.state_for_reallocation()
            assert torch.equal(flat, torch.from_numpy(cut_flat(pm.spec, pl, rank, full, pm.partition)))
        else:
            raise ValueError(check)
    return out


def suite(rank: int, world: int, cases, refs, tmp) -> list:
    from reallm.parallel.groups import GroupCache

    cache = GroupCache()
    out = []
    for case in cases:
        out += _run_case(case, rank, cache, refs, tmp)
    return out


def test_every_layout_matches_single_process(refs, tmp_path):
    results = run_workers(8, suite, CASES, refs, str(tmp_path), timeout_s=240)
    done = {(c, k) for per_rank in results for c, k, _ in per_rank}
    for case in CASES:
        for check in case.checks:
            if check == "train":
                assert (case.name, "updated") in done, f"{case.name}: train check did not run"
            elif check not in ("offload",):
                assert (case.name, check) in done, f"{case.name}: {check} did not run on any rank"
    # What one layout saved, transformers loads: the same tensors, no lm_head when tied, a critic head.
    from safetensors.torch import load_file

    llama = load_file(os.path.join(tmp_path, "llama_d2p2m2", "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, "llama_d2p2m2"))
    for name, t in hf.state_dict().items():
        assert torch.equal(t, llama[name]), name
        _close(t, refs["llama"].updated[name], 1e-5, f"saved {name}")
    tied = load_file(os.path.join(tmp_path, "tied_p4", "model.safetensors"))
    assert "lm_head.weight" not in tied
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, "tied_p4"))
    assert torch.equal(hf.lm_head.weight, tied["model.embed_tokens.weight"])
    critic = transformers.AutoModelForTokenClassification.from_pretrained(os.path.join(tmp_path, "critic_p2m2"))
    ref = refs["critic"]
    mb = micro_batch(ref, list(range(len(ref.seqs))))
    with torch.no_grad():
        values = torch.cat([critic(torch.tensor([s])).logits[0, :, 0] for s in ref.seqs])
    _close(values, ref.post_logits, 1e-4, "transformers critic values after the step")
    assert mb["tokens"].numel() == values.numel()
