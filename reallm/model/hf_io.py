"""HF checkpoints in and out: read only the tensors (or slices) a stage/shard needs; write what transformers loads.

Loading. A checkpoint directory holds ``config.json`` and weights as ``model.safetensors``, sharded
safetensors (``model.safetensors.index.json``), or the ``pytorch_model.bin`` (+ ``.index.json``)
fallback. For every parameter the model holds, ``load_hf_weights`` asks a *slice rule* which part of
the full HF tensor it needs::

    slices(hf_name, full_shape) -> tuple of slice per dim (full coordinates), or None for the whole tensor

(or a mapping ``hf_name -> slices``; missing names mean the whole tensor). The rule is what lets the
layout algebra drive loading: for a device's shards, ``{s.name: s.full_slices for s in shards}``. The
slice is read with ``safe_open(...).get_slice`` (only those bytes) and copied into the front of the local
parameter; local rows beyond it (vocabulary padding under tp) are zeroed. This is the convention of
``reallm.layout.shards``: full index x sits at local index x - box_start.

Critic from a causal-LM checkpoint (``is_critic`` on an SFT model): the ``score`` head is absent, so it is
initialised deterministically, weight ~ N(0, initializer_range) drawn on CPU from ``critic_init_seed``
and bias 0 (the same values on every rank and layout), and one log line says so. A critic from a
``*ForSequenceClassification`` reward checkpoint (``score.weight`` without a bias) gets a zero bias.

Saving writes an HF directory: ``config.json`` (``ModelSpec.to_hf_config()`` plus the source's token ids
and rope / sliding-window fields), ``generation_config.json``, safetensors (``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` + index when larger than ``max_shard_bytes``) and the source's
tokenizer files. The actor loads as ``*ForCausalLM`` (tied: no ``lm_head.weight``), the critic as
``*ForTokenClassification`` with ``num_labels=1``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch

from reallm.errors import UserError
from reallm.model.arch import ArchConfig, arch_from_hf_config, arch_from_spec, hf_rope_scaling_json
from reallm.model.transformer import StageSpec, Transformer
from reallm.spec import ModelSpec, load_hf_config, spec_from_hf_config

logger = logging.getLogger(__name__)

SliceTuple = tuple[slice, ...]
#: Per HF name, the part of the full tensor to read (None: all of it).
SliceFn = Callable[[str, tuple[int, ...]], Optional[SliceTuple]]
SliceRule = Union[SliceFn, Mapping[str, SliceTuple], None]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
#: Config fields copied from the source checkpoint into a saved one (token ids, attention details).
_CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "use_sliding_window",
                        "max_window_layers", "layer_types", "initializer_range", "attention_dropout")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# -- reading config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFModelInfo:
    """What a checkpoint directory says about the model: spec, architecture details, raw config."""

    path: str
    spec: ModelSpec
    arch: ArchConfig
    config: dict


def read_hf_model(path: str, is_critic: bool = False) -> HFModelInfo:
    """Spec and architecture of the checkpoint at ``path`` (config.json only; no weights read)."""
    cfg = load_hf_config(path)
    spec = spec_from_hf_config(cfg, source=path, is_critic=is_critic)
    # transformers >= 5 writes rope scaling under rope_parameters, which spec_from_hf_config misses.
    rs = hf_rope_scaling_json(cfg, where=path)
    if rs != spec.rope_scaling_json:
        spec = dataclasses.replace(spec, rope_scaling_json=rs)
    return HFModelInfo(path, spec, arch_from_hf_config(cfg, where=path), cfg)


# -- reading weights --------------------------------------------------------------------------------------


class CheckpointReader:
    """Name → file map of an HF checkpoint directory; reads whole tensors or slices, file by file."""

    def __init__(self, path: str):
        self.path = path
        self.kind, self.weight_map = self._index(path)
        # Base-model checkpoints (LlamaModel) name tensors without the "model." prefix.
        self._aliases = {}
        for name in self.weight_map:
            if not name.startswith(("model.", "lm_head.", "score.")):
                self._aliases["model." + name] = name

    @staticmethod
    def _index(path: str) -> tuple[str, dict[str, str]]:
        def from_index(fname: str) -> dict[str, str]:
            with open(os.path.join(path, fname)) as f:
                return dict(json.load(f)["weight_map"])

        if os.path.exists(os.path.join(path, SAFE_INDEX)):
            return "safetensors", from_index(SAFE_INDEX)
        if os.path.exists(os.path.join(path, SAFE_SINGLE)):
            from safetensors import safe_open

            with safe_open(os.path.join(path, SAFE_SINGLE), framework="pt") as f:
                return "safetensors", {k: SAFE_SINGLE for k in f.keys()}
        if os.path.exists(os.path.join(path, BIN_INDEX)):
            return "bin", from_index(BIN_INDEX)
        if os.path.exists(os.path.join(path, BIN_SINGLE)):
            return "bin", {"*": BIN_SINGLE}
        raise UserError(f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _resolve(self, name: str) -> Optional[tuple[str, str]]:
        """(file, stored name) of ``name``, or None when the checkpoint lacks it."""
        if "*" in self.weight_map:
            return self.weight_map["*"], name
        stored = name if name in self.weight_map else self._aliases.get(name)
        return None if stored is None else (self.weight_map[stored], stored)

    def has(self, name: str) -> bool:
        if "*" in self.weight_map:
            state = self._bin_state(self.weight_map["*"])
            return name in state or self._strip(name) in state
        return self._resolve(name) is not None

    @staticmethod
    def _strip(name: str) -> str:
        return name[len("model."):] if name.startswith("model.") else name

    def _bin_state(self, fname: str) -> dict:
        cache = self.__dict__.setdefault("_bin_cache", {})
        if fname not in cache:
            cache[fname] = torch.load(os.path.join(self.path, fname), map_location="cpu", mmap=True, weights_only=True)
        return cache[fname]

    def read(self, requests: Mapping[str, Optional[SliceTuple]]) -> dict[str, torch.Tensor]:
        """``{name: tensor or slice}`` for the requested names (absent names are skipped)."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for name in requests:
            if "*" in self.weight_map:
                by_file[self.weight_map["*"]].append((name, name))
            else:
                r = self._resolve(name)
                if r is not None:
                    by_file[r[0]].append((name, r[1]))
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            if self.kind == "safetensors":
                from safetensors import safe_open

                with safe_open(os.path.join(self.path, fname), framework="pt", device="cpu") as f:
                    for name, stored in names:
                        sl = requests[name]
                        out[name] = f.get_tensor(stored) if sl is None else f.get_slice(stored)[sl]
            else:
                state = self._bin_state(fname)
                for name, stored in names:
                    t = state.get(stored, state.get(self._strip(stored)))
                    if t is None:
                        continue
                    sl = requests[name]
                    out[name] = t if sl is None else t[sl]
        return out

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        """Full shape of a stored tensor, read from the header (safetensors) without loading it."""
        if self.kind == "safetensors":
            r = self._resolve(name)
            if r is None:
                return None
            from safetensors import safe_open

            with safe_open(os.path.join(self.path, r[0]), framework="pt") as f:
                return tuple(f.get_slice(r[1]).get_shape())
        for fname in set(self.weight_map.values()):
            state = self._bin_state(fname)
            t = state.get(name, state.get(self._strip(name)))
            if t is not None:
                return tuple(t.shape)
        return None


def _slices_for(rule: SliceRule, name: str, shape: tuple[int, ...]) -> Optional[SliceTuple]:
    if rule is None:
        return None
    if callable(rule):
        return rule(name, shape)
    return rule.get(name)


def _expected_full_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Full HF shapes from the spec (the local parameters may be tp shards)."""
    from reallm.layout.params import param_table

    return {p.name: p.shape for p in param_table(model.spec)}


@torch.no_grad()
def _copy_into(param: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy ``src`` into the leading box of ``param``; zero what lies beyond (vocabulary padding rows)."""
    if src.dim() != param.dim() or any(s > p for s, p in zip(src.shape, param.shape, strict=False)):
        raise UserError(f"{name}: read {tuple(src.shape)} but the local parameter is {tuple(param.shape)}")
    if tuple(src.shape) != tuple(param.shape):
        if any(s != p for s, p in zip(src.shape[1:], param.shape[1:], strict=False)):
            raise UserError(f"{name}: read {tuple(src.shape)} does not fit local {tuple(param.shape)} "
                            f"(only dim 0 may be padded)")
        param.zero_()
    param[tuple(slice(0, n) for n in src.shape)].copy_(src.to(dtype=param.dtype, device=param.device))


@torch.no_grad()
def init_critic_head(score: torch.nn.Linear, seed: int, std: float) -> None:
    """Deterministic critic head: weight ~ N(0, std) from a CPU generator seeded with ``seed``, bias 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(tuple(score.weight.shape), generator=g, dtype=torch.float32) * std
    score.weight.copy_(w.to(score.weight.dtype))
    if score.bias is not None:
        score.bias.zero_()


def load_hf_weights(model: Transformer, path: str, *, slices: SliceRule = None, critic_init_seed: int = 1,
                    reader: Optional[CheckpointReader] = None) -> list[str]:
    """Fill ``model``'s parameters from the checkpoint at ``path``; returns the HF names initialised instead.

    ``slices``: the per-parameter slice rule (module docstring); None reads whole tensors.
    """
    reader = reader or CheckpointReader(path)
    full_shapes = _expected_full_shapes(model)
    params = dict(model.hf_named_parameters())
    requests: dict[str, Optional[SliceTuple]] = {}
    for name in params:
        requests[name] = _slices_for(slices, name, full_shapes.get(name, tuple(params[name].shape)))
    tensors = reader.read(requests)
    initialised: list[str] = []
    missing = [n for n in params if n not in tensors]
    if model.is_critic and model.score is not None and "score.weight" in missing:
        cfg = _maybe_config(path)
        std = float(cfg.get("initializer_range", 0.02))
        init_critic_head(model.score, critic_init_seed, std)
        initialised = ["score.weight", "score.bias"]
        logger.info("critic %s: no score head in the checkpoint; initialised score.weight ~ N(0, %g) from seed %d, "
                    "score.bias = 0", path, std, critic_init_seed)
    elif model.is_critic and "score.bias" in missing and "score.weight" not in missing:
        # A *ForSequenceClassification reward model: same head shape, no bias.
        assert model.score is not None and model.score.bias is not None
        model.score.bias.data.zero_()
        initialised = ["score.bias"]
        logger.info("critic %s: checkpoint has score.weight but no score.bias; bias set to 0", path)
    missing = [n for n in missing if n not in initialised]
    if missing:
        hint = ""
        if "lm_head.weight" in missing and reader.has("score.weight"):
            hint = " (the checkpoint looks like a critic/reward model: set is_critic=True)"
        raise UserError(f"{path}: checkpoint lacks {len(missing)} parameter(s): {missing[:6]}"
                        f"{' ...' if len(missing) > 6 else ''}{hint}")
    for name, t in tensors.items():
        sl = requests[name]
        if sl is None and name in full_shapes and tuple(t.shape) != full_shapes[name]:
            raise UserError(f"{path}: {name} has shape {tuple(t.shape)}, config.json implies {full_shapes[name]}")
        _copy_into(params[name], t, name)
    return initialised


def _maybe_config(path: str) -> dict:
    try:
        return load_hf_config(path)
    except UserError:
        return {}


def load_hf_model(path: str, *, is_critic: bool = False, stage: Optional[StageSpec] = None,
                  dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                  slices: SliceRule = None, critic_init_seed: int = 1, **model_kwargs) -> Transformer:
    """Build a stage (default: the whole model) from an HF checkpoint and load its weights."""
    info = read_hf_model(path, is_critic)
    model = Transformer.empty(info.spec, stage, arch=info.arch, device=device, dtype=dtype, **model_kwargs)
    load_hf_weights(model, path, slices=slices, critic_init_seed=critic_init_seed)
    return model


# -- saving -----------------------------------------------------------------------------------------------


def hf_config_for_save(spec: ModelSpec, arch: Optional[ArchConfig] = None, source_config: Optional[dict] = None,
                       dtype: Optional[torch.dtype] = None) -> dict:
    """config.json of a saved checkpoint: the spec's, plus the source's token ids and attention details."""
    cfg = spec.to_hf_config()
    arch = arch or arch_from_spec(spec)
    cfg["rope_theta"] = arch.rope.theta
    cfg["rope_scaling"] = arch.rope.to_hf_rope_scaling()
    for key in _CARRIED_CONFIG_KEYS:
        if source_config and key in source_config:
            cfg[key] = source_config[key]
    if "sliding_window" not in cfg:
        # MistralConfig defaults to a 4096 window when the key is absent; say "none" unless the arch has one.
        windows = {w for w in arch.sliding_windows if w is not None}
        cfg["sliding_window"] = windows.pop() if windows else None
    if spec.is_critic:
        # *ForTokenClassification has no lm_head to tie; a true flag would only confuse readers.
        cfg["tie_word_embeddings"] = False
    if dtype is not None:
        cfg["dtype"] = str(dtype).replace("torch.", "")
    return cfg


def _generation_config(cfg: dict, source_path: Optional[str]) -> dict:
    if source_path and os.path.exists(os.path.join(source_path, "generation_config.json")):
        with open(os.path.join(source_path, "generation_config.json")) as f:
            return json.load(f)
    return {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}


def _clear_old_weights(out_dir: str) -> None:
    # A stale index or shard from an earlier save would be read alongside the new files.
    for f in os.listdir(out_dir):
        if (f.startswith("model") and f.endswith(".safetensors")) or f in (SAFE_INDEX, BIN_INDEX) or (
                f.startswith("pytorch_model") and f.endswith(".bin")):
            os.remove(os.path.join(out_dir, f))


def write_safetensors(tensors: Mapping[str, torch.Tensor], out_dir: str,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write tensors (in the given order) as one file or shards + index; returns the files written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # contiguous CPU copies: safetensors refuses shared or strided storage (tied weights, slices).
        shards[-1][name] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
        total += nbytes
    files = []
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        files.append(fname)
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [SAFE_INDEX]


def save_hf_checkpoint(out_dir: str, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], *,
                       arch: Optional[ArchConfig] = None, source_path: Optional[str] = None,
                       dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write full tensors (HF names) as a checkpoint transformers loads; checks names and shapes first.

    ``tensors`` may come from any layout (the executor gathers them); they are written in the parameter
    table's order, cast to ``dtype`` if given. With tied embeddings an ``lm_head.weight`` entry is dropped.
    """
    from reallm.layout.params import param_table

    table = param_table(spec)
    problems = []
    ordered: dict[str, torch.Tensor] = {}
    for p in table:
        t = tensors.get(p.name)
        if t is None:
            problems.append(f"missing {p.name}")
        elif tuple(t.shape) != p.shape:
            problems.append(f"{p.name} has shape {tuple(t.shape)}, expected {p.shape}")
        else:
            ordered[p.name] = t if dtype is None else t.to(dtype)
    extra = sorted(set(tensors) - {p.name for p in table} - {"lm_head.weight"})
    if extra:
        problems.append(f"unexpected tensors {extra[:6]}")
    if problems:
        raise ValueError(f"cannot save {out_dir}: " + "; ".join(problems))
    os.makedirs(out_dir, exist_ok=True)
    _clear_old_weights(out_dir)
    write_safetensors(ordered, out_dir, max_shard_bytes)
    source_cfg = _maybe_config(source_path) if source_path else None
    save_dtype = dtype or next(iter(ordered.values())).dtype
    cfg = hf_config_for_save(spec, arch, source_cfg, save_dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(_generation_config(cfg, source_path), f, indent=2, sort_keys=True)
    if source_path:
        copy_tokenizer_files(source_path, out_dir)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
            copied.append(f)
    return copied


def save_hf_model(model: Transformer, out_dir: str, *, source_path: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Save a whole single-process model (one stage holding everything) as an HF checkpoint."""
    st = model.stage
    if not (st.has_embedding and st.has_head and len(st.layers) == model.spec.num_layers):
        raise ValueError("save_hf_model needs the whole model; gather a pipeline's stages and use save_hf_checkpoint")
    tensors = {name: p.detach() for name, p in model.hf_named_parameters()}
    save_hf_checkpoint(out_dir, model.spec, tensors, arch=model.arch, source_path=source_path, dtype=dtype,
                       max_shard_bytes=max_shard_bytes)


def hf_tensors(models: Iterable[Transformer]) -> dict[str, torch.Tensor]:
    """Full HF tensors of several stages of one (tp=1) pipeline, e.g. to save it from one process."""
    out: dict[str, torch.Tensor] = {}
    for m in models:
        for name, p in m.hf_named_parameters():
            out.setdefault(name, p.detach())
    return out
