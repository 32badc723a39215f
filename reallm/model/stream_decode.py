"""Decode steps as one persistent kernel launch (:mod:`reallm.kernels.decode_step`), behind the interface of
:class:`reallm.model.generate.DecodeRunner`.

Where the model and the batch fit the kernel (:func:`unusable` says why not), a generation's decode steps run
as one ``DecodeStep`` launch, replayed from a CUDA graph, instead of about ten library kernels a layer
(BENCHMARKS.md, decode step). Two things differ from the library step:

- the kernel reads its own packed copy of the weights (the norms' weights folded in; one copy per model,
  shared by its runners over several caches), packed again at the first step of every generation: the
  executor rewrites weights in ways no version counter sees (reallocation kernels writing a buffer that may
  sit where the last one did), and a pack costs a few milliseconds against a generation's hundreds;
- it reads and appends keys and values in its *stream layout* (:func:`~reallm.kernels.decode_stream.stream_cache`),
  while a prefill writes the plain one: at the first step after a prefill (:meth:`StreamDecodeRunner.after_prefill`)
  the runner permutes the whole cache in place. From then until the next prefill only its decode steps may
  touch the cache — the generation loops own their caches, so nothing else does.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from reallm import working_set
from reallm.kernels import decode_step, decode_stream

ROWS = decode_stream.ROWS
logger = logging.getLogger(__name__)


def unusable(model, batch: int, device) -> Optional[str]:
    """Why decode steps of ``model`` for ``batch`` sequences on ``device`` cannot run as the stream kernel
    (None: they can): the shapes (``working_set.stream_decode_unfit``), then this model and device."""
    if not getattr(model, "use_stream_decode", True):
        return "turned off (use_stream_decode)"
    if torch.device(device).type != "cuda":
        return "not on CUDA"
    if not (model.stage.has_embedding and model.stage.has_head):
        return "not a whole model (one stage with the embedding and the LM head)"
    if model.has_tp_hooks():
        return "tensor parallel (its collectives hang on the blocks' modules)"
    unfit = working_set.stream_decode_unfit(model.spec, batch)
    if unfit is not None:
        return unfit
    if any(model.arch.sliding_window(i) is not None for i in model.stage.layers):
        return "sliding-window attention"
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):
        return "parameters not in bfloat16"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return f"a {torch.cuda.get_device_name(device)} (the kernel is built for sm_90)"
    if not decode_step.available():
        return f"the decode_stream kernel did not build: {decode_stream._EXT.error}"
    return None


def unusable_logged(model, batch: int, device) -> Optional[str]:
    """:func:`unusable`, logging the reason once per model when a CUDA generation falls back to the library
    step (a kernel that did not build on an H100, a shape that does not fit)."""
    why = unusable(model, batch, device)
    if why is not None and torch.device(device).type == "cuda" and getattr(model, "use_stream_decode", True):
        seen = model.__dict__.setdefault("_stream_decode_refusals", set())
        if why not in seen:
            seen.add(why)
            logger.info("decode steps run the library step, not the one-launch stream kernel: %s", why)
    return why


class _Packed:
    """One model's packed weights, shared by its runners (held by them; gone with the last)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors


#: id(model) -> its packed weights while a runner holds them.
_PACKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def hf_weights(model) -> dict[str, torch.Tensor]:
    """The model's parameters by HF name (a tied LM head under both names)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.setdefault("lm_head.weight", model.model.embed_tokens.weight)
    return named


class StreamDecodeRunner:
    """``runner(tokens_B, positions_B) -> logits [B, V]`` over ``cache`` (module docstring).

    ``use_graph``: replay the step (embedding, input preparation, the kernel) from a CUDA graph, captured at
    the second call like ``DecodeRunner``'s. ``kernel=False`` runs the kernel's torch definition instead
    (``DecodeStep.reference``; any device): what the tests compare the integration with.
    """

    @torch.no_grad()
    def __init__(self, model, cache, use_graph: bool = True, kernel: bool = True):
        layers = list(model.stage.layers)
        if cache.max_len % decode_stream.CHUNK:
            raise ValueError(f"StreamDecodeRunner: the cache holds {cache.max_len} positions, not a multiple of "
                             f"{decode_stream.CHUNK} (make it with working_set.stream_cache_len)")
        spec = model.spec
        device = model.model.embed_tokens.weight.device
        self.model, self.cache, self.kernel = model, cache, kernel
        self.use_graph = use_graph and kernel and device.type == "cuda"
        shared = _PACKED.get(id(model)) if kernel else None
        self.step = decode_step.DecodeStep(
            hf_weights(model), layers=len(layers), heads=spec.num_heads, kv_heads=spec.num_kv_heads,
            eps=spec.rms_norm_eps, inv_freq=model.arch.rope.inv_freq(spec.head_dim, device=device),
            k_caches=[cache.k[i] for i in layers], v_caches=[cache.v[i] for i in layers], keep_plain=not kernel,
            packed=shared.tensors if shared is not None else None, pack=not kernel)  # kernel: packed at _begin
        if kernel:
            self._packed = shared or _Packed(self.step.packed())
            _PACKED[id(model)] = self._packed
        self._plain_cache = True  # a prefill wrote the plain layout: permute before the next step
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0

    def after_prefill(self) -> None:
        """A prefill wrote the cache (plain layout): the next step packs the weights and permutes the cache."""
        self._plain_cache = True

    def _begin(self) -> None:
        self.step.load(hf_weights(self.model))
        decode_stream.stream_caches_in_place([*self.cache.k.values(), *self.cache.v.values()])
        self._plain_cache = False

    def _run(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        self.step.set_tokens(tokens_B, positions_B, self.model.model.embed_tokens.weight)
        return self.step.run() if self.kernel else self.step.reference()

    @torch.no_grad()
    def __call__(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        B = tokens_B.shape[0]
        if self._plain_cache:  # the first step of a generation
            self._begin()
        if not self.use_graph:
            return self._run(tokens_B, positions_B)[:B]
        if self.graph is None and self.calls > 1:  # the first call ran eagerly: nothing lazy left to capture
            from reallm.model.generate import _capture_stream

            stream = _capture_stream(tokens_B.device)
            self.static_tokens, self.static_positions = tokens_B.clone(), positions_B.clone()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self.static_out = self._run(self.static_tokens, self.static_positions)[:B]
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = graph  # only a completed capture is replayed
        if self.graph is None:
            return self._run(tokens_B, positions_B)[:B]
        self.static_tokens.copy_(tokens_B)
        self.static_positions.copy_(positions_B)
        self.graph.replay()
        return self.static_out
