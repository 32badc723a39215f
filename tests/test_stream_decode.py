"""The one-launch decode step behind the generation loops (reallm/model/stream_decode.py): teacher-forced
steps against the library step (``model.decode``) on the same model — the cache permuted after each prefill,
new weights packed between generations, CUDA graphs on the GPU — and when it is (not) chosen."""

import pytest
import torch

from reallm import working_set
from reallm.model import stream_decode
from reallm.model.generate import DecodeRunner, decode_runner
from reallm.model.stream_decode import StreamDecodeRunner, unusable
from reallm.model.transformer import Transformer, pack_sequences
from reallm.spec import ModelSpec

SPEC = ModelSpec("llama", num_layers=2, hidden_size=256, intermediate_size=384, num_heads=4, num_kv_heads=2,
                 head_dim=64, vocab_size=256, rms_norm_eps=1e-5, source="tiny stream-decode")
PROMPTS = [[5, 9, 3], list(range(1, 12)), [7], list(range(30, 160))]  # 130 tokens: keys over two slots
STEPS = 5


def _model(device, seed=0):
    model = Transformer(SPEC, device=device, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model.init_weights(seed, std=0.08)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # away from 1: folding the norms into the matrices is tested
                p.uniform_(0.5, 1.5)
    return model


def _teacher_forced(model, runner, cache, tokens_BN):
    """Prefill PROMPTS into ``cache``, then STEPS decode steps fed ``tokens_BN``: the logits of each (fp32)."""
    dev = tokens_BN.device
    tokens, cu = pack_sequences(PROMPTS, device=dev)
    with torch.no_grad():
        model.prefill(tokens, cu, cache)
        runner.after_prefill()
        lengths = torch.tensor([len(p) for p in PROMPTS], dtype=torch.int64, device=dev)
        return [runner(tokens_BN[:, t], lengths + t).float().clone() for t in range(STEPS)]


def _worst(got, want):
    """Largest difference over the steps, relative to the logits' range."""
    return max(float((g - w).abs().max() / (w.max() - w.min())) for g, w in zip(got, want))


def _check_against_library(device, kernel):
    model = _model(device)
    B = len(PROMPTS)
    tokens_BN = torch.randint(1, SPEC.vocab_size, (B, STEPS), generator=torch.Generator().manual_seed(1)).to(device)
    lib_cache, cache = model.new_kv_cache(B, 256), model.new_kv_cache(B, 256)
    lib = DecodeRunner(model, lib_cache, use_graph=device == "cuda")
    runner = StreamDecodeRunner(model, cache, use_graph=True, kernel=kernel)
    want = _teacher_forced(model, lib, lib_cache, tokens_BN)
    got = _teacher_forced(model, runner, cache, tokens_BN)
    assert _worst(got, want) < 0.03
    # A second generation after an update of the weights (a version bump): the runner packs them again,
    # and (on CUDA) its kept graph replays with them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(device, p.dtype) * 0.02)
    want2 = _teacher_forced(model, lib, lib_cache, tokens_BN)
    got2 = _teacher_forced(model, runner, cache, tokens_BN)
    assert _worst(got2, want2) < 0.03
    assert _worst(want2, want) > 0.1  # the update changed the logits: the check above could fail
    return model, tokens_BN, want2


def test_definition_matches_the_library_step_across_generations():
    """CPU: the runner with the kernel's torch definition (``kernel=False``) against ``model.decode``; and it
    fails when the cache is not permuted after the prefill (the check can tell)."""
    model, tokens_BN, want = _check_against_library("cpu", kernel=False)
    cache = model.new_kv_cache(len(PROMPTS), 256)
    runner = StreamDecodeRunner(model, cache, use_graph=False, kernel=False)
    runner.after_prefill = lambda: None  # forget the permutation: keys read in the wrong layout
    runner._plain_cache = False
    assert _worst(_teacher_forced(model, runner, cache, tokens_BN), want) > 0.1


@pytest.mark.skipif(not torch.cuda.is_available() or unusable(_model("cpu"), 4, "cuda") is not None
                    if torch.cuda.is_available() else True, reason="needs the decode_stream kernel (sm_90)")
def test_kernel_matches_the_library_step_with_graphs():
    """GPU: the kernel replayed from a CUDA graph (captured at the second step, kept for the second
    generation) against the library step."""
    _check_against_library("cuda", kernel=True)


def test_when_it_is_chosen():
    model = _model("cpu")
    assert unusable(model, 4, "cpu") == "not on CUDA"
    assert isinstance(decode_runner(model, model.new_kv_cache(4, 128), use_graph=False), DecodeRunner)
    assert "sequences" in unusable(model, 65, "cuda")
    model.use_stream_decode = False
    assert "turned off" in unusable(model, 4, "cuda")
    for field, value, words in (("head_dim", 32, "head_dim"), ("num_kv_heads", 4, "query heads"),
                                ("vocab_size", 200, "vocab")):
        kw = dict(SPEC.__dict__, **{field: value})
        if field == "head_dim":
            kw["hidden_size"] = 128
        other = Transformer(ModelSpec(**kw), device="cpu", dtype=torch.bfloat16)
        assert words in unusable(other, 4, "cuda")
    assert "bfloat16" in unusable(Transformer(SPEC, device="cpu", dtype=torch.float32), 4, "cuda")
    with pytest.raises(ValueError, match="multiple of 128"):
        StreamDecodeRunner(_model("cpu"), _model("cpu").new_kv_cache(2, 100), kernel=False)


def test_the_memory_rules_match_what_the_step_holds():
    """``working_set.stream_decode_bytes`` (what the planner charges a generation call) against the runner's
    own tensors: the packed weights exactly, buffers and sums tiles within the bound; the planner charges
    them, and the cache's whole slots, only where the stream step runs."""
    from planner.cost_model.memory import call_memory
    from planner.cost_model.shapes import ModelOptions
    from reallm.dataflow import Call
    from reallm.placement import Placement

    model = _model("cpu")
    runner = StreamDecodeRunner(model, model.new_kv_cache(4, 256), use_graph=False, kernel=False)
    step, prog = runner.step, runner.step.program
    built = prog._build(132)  # an H100's grid
    held = step.weight_bytes + sum(t.numel() * t.element_size() for t in step.buffers + [step.logits]) \
        + built["partial"].numel() * 4
    packed = 2 * sum(p.numel() for n, p in model.named_parameters() if not n.endswith("norm.weight")
                     and "embed_tokens" not in n)
    assert step.weight_bytes == packed
    bound = working_set.stream_decode_bytes(SPEC)
    assert 0.9 * bound <= held <= bound
    assert working_set.stream_cache_len(129) == 256 and working_set.stream_cache_len(128) == 128
    assert working_set.stream_decode_unfit(SPEC, 4) is None
    assert "tp 2" in working_set.stream_decode_unfit(SPEC, 4, tp=2)
    assert "critic" in working_set.stream_decode_unfit(ModelSpec(**dict(SPEC.__dict__, is_critic=True)), 4)
    assert working_set.stream_decode_device("NVIDIA H100 80GB HBM3") and not working_set.stream_decode_device("cpu")
    gen = Call("actor_gen", "actor", "generate", ("prompts",), ("tokens",), n_seqs=4, max_seqlen=200,
               max_new_tokens=100)
    one = Placement((0,))
    lib, stream = (call_memory(gen, one, SPEC, ModelOptions(stream_decode=s)) for s in (False, True))
    kv_per_pos = 4 * 2 * SPEC.num_layers * SPEC.num_kv_heads * SPEC.head_dim * 2
    assert stream.transient_bytes - lib.transient_bytes == pytest.approx(bound + (256 - 200) * kv_per_pos)
    assert call_memory(gen, Placement((0, 1), tp=2), SPEC, ModelOptions(stream_decode=True)).transient_bytes \
        == call_memory(gen, Placement((0, 1), tp=2), SPEC, ModelOptions()).transient_bytes


def test_the_ring_keeps_a_runner_and_permutes_after_each_prefill(monkeypatch):
    """The executor's generation (``ParallelModel.generate``, one rank, kept decode graphs) through the stream
    runner (its torch definition, on CPU): a second call reuses the kept runner and cache and gives the
    first call's tokens — which it does not when the ring's ``after_prefill`` is skipped (the cache left in
    the prefill's layout): the check can tell."""
    from executor.comm import Group
    from reallm.model.generate import GenerationConfig
    from reallm.parallel import ParallelModel
    from reallm.parallel.groups import ParallelGroups
    from reallm.placement import Placement

    made = []

    class Reference(StreamDecodeRunner):
        def __init__(self, model, cache, use_graph=True, kernel=True):
            super().__init__(model, cache, use_graph=False, kernel=False)
            made.append(self)

    monkeypatch.setattr(stream_decode, "unusable", lambda model, batch, device: None)
    monkeypatch.setattr(stream_decode, "StreamDecodeRunner", Reference)
    groups = ParallelGroups.build(Placement((0,)), 0, lambda ranks: Group(tuple(ranks), None))
    pm = ParallelModel.build(None, groups, spec=SPEC, dtype=torch.bfloat16, device="cpu", init_seed=3,
                             compile_blocks=False, inference_graphs=False)
    with torch.no_grad():
        for p in pm.model.parameters():
            p.mul_(4.0)  # std 0.08: attention far from uniform, so a wrong cache layout shows
    pm.keep_decode_graphs(True)
    cfg = GenerationConfig(max_new_tokens=8, greedy=True)
    prompts = [p[:40] for p in PROMPTS]

    def run():
        return pm.generate(prompts, cfg, eos_token_id=None, pad_token_id=0).tokens_BN

    first, second = run(), run()
    assert len(made) == 1 and torch.equal(first, second)
    monkeypatch.setattr(Reference, "after_prefill", lambda self: None)
    assert not torch.equal(run(), first)


def test_runners_of_one_model_share_its_packed_weights_and_repack_them():
    """The kernel's runners (made on CPU; nothing launched): no plain copy kept, one packed copy per model
    shared by runners over different caches, packed again at the first step after a prefill — equal to a
    fresh pack of the new weights."""
    model = _model("cpu")
    one = StreamDecodeRunner(model, model.new_kv_cache(2, 128), use_graph=False)
    two = StreamDecodeRunner(model, model.new_kv_cache(3, 256), use_graph=False)
    assert all(p.w is None or p.w.device.type == "meta" for p in one.step.program.products)
    assert all(a is b for a, b in zip(one.step.packed(), two.step.packed(), strict=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    one._begin()  # what the first step after a prefill does first
    fresh = StreamDecodeRunner(_model("cpu"), model.new_kv_cache(2, 128), use_graph=False, kernel=False)
    fresh.step.load(stream_decode.hf_weights(model))
    for a, b in zip(two.step.packed(), fresh.step.packed(), strict=True):
        assert torch.equal(a, b)
    assert not any(t.requires_grad for t in one.step.packed())
