"""Model specs without weights: the shapes the planner, the layout algebra and the model need.

A ``ModelSpec`` comes either from an HF ``config.json`` (read as plain JSON, no transformers import)
or from a preset named by ``type._class`` + ``type.size`` (billions of parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from reallm.errors import UserError

#: HF ``model_type`` → our family name. All are LLaMA-shaped decoders (RMSNorm, SwiGLU, RoPE).
FAMILIES = ("llama", "mistral", "qwen2")
_CLASS_ALIASES = {"llama": "llama", "llama2": "llama", "llama3": "llama", "codellama": "llama",
                  "mistral": "mistral", "qwen2": "qwen2"}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a LLaMA-family decoder; enough to size every parameter and activation."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    #: HF ``rope_scaling`` as JSON text (hashable); None for plain RoPE.
    rope_scaling_json: Optional[str] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    #: Qwen2 puts a bias on q/k/v projections.
    qkv_bias: bool = False
    #: Critic / reward model: one output per token instead of the LM head.
    is_critic: bool = False
    #: Where it came from, for messages ("preset llama-7b", "/ckpt/config.json").
    source: str = field(default="", compare=False)

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        for f in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                  "head_dim", "vocab_size"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if problems:
            raise UserError(f"model spec ({self.source or 'unnamed'}): " + "; ".join(problems))

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_block_params(self) -> int:
        """Parameters of one transformer block."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        return attn + 3 * h * i + 2 * h

    @property
    def num_head_params(self) -> int:
        """Final norm plus the output head (LM head, or the critic's one-output score)."""
        if self.is_critic:  # HF *ForTokenClassification: score = Linear(hidden, 1) with a bias
            return self.hidden_size + self.hidden_size + 1
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    @property
    def num_params(self) -> int:
        return self.vocab_size * self.hidden_size + self.num_layers * self.num_block_params + self.num_head_params

    @property
    def rope_scaling(self) -> Optional[dict]:
        return None if self.rope_scaling_json is None else json.loads(self.rope_scaling_json)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model spec") -> ModelSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{where}: {e}") from None

    def with_critic(self, is_critic: bool) -> ModelSpec:
        return dataclasses.replace(self, is_critic=is_critic)

    def to_hf_config(self) -> dict:
        """The HF config.json this spec corresponds to (the causal LM, or the critic)."""
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[self.family]
        cfg: dict[str, Any] = {
            "model_type": self.family,
            "architectures": [f"{arch}ForTokenClassification" if self.is_critic else f"{arch}ForCausalLM"],
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.family == "llama":
            cfg["attention_bias"] = False
            cfg["mlp_bias"] = False
        if self.is_critic:
            cfg["num_labels"] = 1
            cfg["id2label"] = {"0": "LABEL_0"}
            cfg["label2id"] = {"LABEL_0": 0}
        return cfg


def spec_from_hf_config(cfg: dict, source: str, is_critic: bool = False) -> ModelSpec:
    """Build a spec from the dict of an HF config.json."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise UserError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(FAMILIES)}")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        rs = cfg.get("rope_scaling")
        params = cfg.get("rope_parameters")  # transformers 5 writes RoPE settings here
        theta = cfg.get("rope_theta", 10000.0)
        if isinstance(params, dict) and params:
            theta = params.get("rope_theta", theta)
            if rs is None and params.get("rope_type", params.get("type", "default")) != "default":
                rs = {k: v for k, v in params.items() if k != "rope_theta"}
        return ModelSpec(
            family=mt,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=float(theta),
            rope_scaling_json=None if rs is None else json.dumps(rs, sort_keys=True),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2") or bool(cfg.get("attention_bias", False)),
            is_critic=is_critic,
            source=source,
        )
    except KeyError as e:
        raise UserError(f"{source}: missing field {e.args[0]!r} in config.json") from None


def load_hf_config(path: str) -> dict:
    """Read ``config.json`` of an HF checkpoint directory (or the file itself) as JSON."""
    f = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.exists(f):
        raise UserError(f"{f}: not found; model.path must be an HF checkpoint directory with a config.json")
    try:
        with open(f) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: line {e.lineno}: malformed JSON ({e.msg})") from None


def _p(family, layers, hidden, inter, heads, kv, vocab, max_pos=4096, theta=10000.0, tied=False, bias=False):
    return dict(family=family, num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                num_kv_heads=kv, head_dim=hidden // heads, vocab_size=vocab, max_position_embeddings=max_pos,
                rope_theta=theta, tie_word_embeddings=tied, qkv_bias=bias, rms_norm_eps=1e-5 if family == "llama" else 1e-6)


#: (class, size in billions) → shape. ``llama`` means LLaMA-2 except sizes only LLaMA-3 has (8).
PRESETS: dict[tuple[str, float], dict] = {
    ("llama", 1.1): _p("llama", 22, 2048, 5632, 32, 4, 32000, 2048),
    ("llama", 7): _p("llama", 32, 4096, 11008, 32, 32, 32000),
    ("llama", 13): _p("llama", 40, 5120, 13824, 40, 40, 32000),
    ("llama", 70): _p("llama", 80, 8192, 28672, 64, 8, 32000),
    ("codellama", 34): _p("llama", 48, 8192, 22016, 64, 8, 32000, 16384, 1e6),
    ("llama", 34): _p("llama", 48, 8192, 22016, 64, 8, 32000, 16384, 1e6),
    ("llama", 8): _p("llama", 32, 4096, 14336, 32, 8, 128256, 8192, 5e5),
    ("llama3", 8): _p("llama", 32, 4096, 14336, 32, 8, 128256, 8192, 5e5),
    ("llama3", 70): _p("llama", 80, 8192, 28672, 64, 8, 128256, 8192, 5e5),
    ("mistral", 7): _p("mistral", 32, 4096, 14336, 32, 8, 32000, 32768),
    ("qwen2", 0.5): _p("qwen2", 24, 896, 4864, 14, 2, 151936, 32768, 1e6, tied=True, bias=True),
    ("qwen2", 1.5): _p("qwen2", 28, 1536, 8960, 12, 2, 151936, 32768, 1e6, tied=True, bias=True),
    ("qwen2", 7): _p("qwen2", 28, 3584, 18944, 28, 4, 152064, 32768, 1e6, bias=True),
    ("qwen2", 72): _p("qwen2", 80, 8192, 29568, 64, 8, 152064, 32768, 1e6, bias=True),
}


def preset_spec(cls: str, size: float, is_critic: bool = False, where: str = "model.type") -> ModelSpec:
    key = (cls, float(size))
    match = [v for (c, s), v in PRESETS.items() if c == cls and abs(s - float(size)) < 1e-9]
    if not match:
        have = ", ".join(f"{c} {s:g}" for c, s in PRESETS)
        raise UserError(f"{where}: no preset for _class={cls} size={size:g}; known presets: {have}. "
                        f"Set model.path to an HF checkpoint directory instead.")
    return ModelSpec(**match[0], is_critic=is_critic, source=f"preset {key[0]}-{key[1]:g}b")


def resolve_spec(cls: Optional[str], size: Optional[float], path: Optional[str], is_critic: bool,
                 where: str) -> ModelSpec:
    """The spec of one model role: config.json at ``path`` wins over ``type.*`` (warning on disagreement)."""
    if path:
        spec = spec_from_hf_config(load_hf_config(path), source=path, is_critic=is_critic)
        if cls and _CLASS_ALIASES.get(cls, cls) != spec.family:
            warnings.warn(f"{where}._class={cls} disagrees with {path}/config.json (model_type={spec.family}); "
                          f"using the checkpoint's", stacklevel=2)
        if cls and size:
            try:
                preset = preset_spec(cls, size, is_critic)
                if abs(preset.num_params - spec.num_params) > 0.25 * preset.num_params:
                    warnings.warn(f"{where}.size={size:g} disagrees with {path} "
                                  f"({spec.num_params / 1e9:.3g}B parameters); using the checkpoint's",
                                  stacklevel=2)
            except UserError:
                pass
        return spec
    if not cls or size is None:
        raise UserError(f"{where}: give either path (an HF checkpoint directory) or both type._class and type.size")
    if cls not in _CLASS_ALIASES:
        raise UserError(f"{where}._class={cls!r} is not supported; use one of {sorted(_CLASS_ALIASES)}")
    return preset_spec(cls, size, is_critic, where=where)
