"""What the model needs beyond ``ModelSpec``: rotary embedding parameters and per-layer sliding windows.

RoPE (Su et al.) rotates each query/key head vector, pair (x_j, x_{j+d/2}) by the angle ``pos * f_j``
with inverse frequencies (d = head_dim, j = 0 .. d/2-1)::

    f_j = theta ** (-2j / d)                                   rope_type "default"
    f_j = theta ** (-2j / d) / factor                          rope_type "linear" (position interpolation)
    llama3 (Llama 3.1): with wavelength w_j = 2*pi / f_j, L = original_max_position_embeddings,
        w_j < L / high_freq_factor           → f_j                                  (high frequencies kept)
        w_j > L / low_freq_factor            → f_j / factor                         (low frequencies scaled)
        otherwise, s = (L / w_j - low_freq_factor) / (high_freq_factor - low_freq_factor),
                                             → (1 - s) * f_j / factor + s * f_j     (smooth interpolation)

``cos``/``sin`` are computed in fp32 from the integer positions and cast to the activation dtype, as
transformers does, so logits agree to fp32 rounding.

Config formats: transformers >= 5 writes ``rope_parameters`` (``rope_type``, ``rope_theta`` and the
scaling fields together); older checkpoints write ``rope_theta`` plus ``rope_scaling`` (with ``type``
or ``rope_type``). Both are read here. Other rope types (dynamic, yarn, longrope, ...) raise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from reallm.errors import UserError
from reallm.spec import ModelSpec

#: Rope types implemented here; anything else raises ``UserError``.
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (module docstring gives the formulas)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise UserError(f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.theta <= 0 or self.factor <= 0:
            raise UserError(f"rope theta and factor must be positive, got theta={self.theta}, factor={self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise UserError(f"llama3 rope needs high_freq_factor > low_freq_factor, got "
                            f"{self.high_freq_factor} <= {self.low_freq_factor}")

    def inv_freq(self, head_dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Inverse frequencies ``f_j`` [head_dim // 2], fp32."""
        # Same expression as transformers (int arange → float, then pow) so the values are bit-identical.
        f = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        if self.rope_type == "linear":
            return f / self.factor
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / f
            scaled = torch.where(wavelen > low_wavelen, f / self.factor, f)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(is_medium, smoothed, scaled)
        return f

    def to_hf_rope_scaling(self) -> Optional[dict]:
        """The legacy ``rope_scaling`` dict (None for default rope), which transformers 4 and 5 both read."""
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        return out


@dataclass(frozen=True)
class ArchConfig:
    """Architecture details the spec does not carry. ``sliding_windows[i]`` is block i's window or None."""

    rope: RopeConfig
    sliding_windows: tuple[Optional[int], ...]

    def sliding_window(self, layer: int) -> Optional[int]:
        return self.sliding_windows[layer]


def rope_from_dict(theta: float, scaling: Optional[dict], max_position_embeddings: int, where: str) -> RopeConfig:
    """RoPE parameters from a ``rope_scaling`` / ``rope_parameters`` dict (None or type default: plain RoPE)."""
    if not scaling:
        return RopeConfig(theta=theta)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{where}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    try:
        factor = float(scaling["factor"])
        if rope_type == "linear":
            return RopeConfig(theta=theta, rope_type="linear", factor=factor)
        return RopeConfig(theta=theta, rope_type="llama3", factor=factor,
                          low_freq_factor=float(scaling["low_freq_factor"]),
                          high_freq_factor=float(scaling["high_freq_factor"]),
                          original_max_position_embeddings=int(scaling.get("original_max_position_embeddings",
                                                                           max_position_embeddings)))
    except KeyError as e:
        raise UserError(f"{where}: rope type {rope_type!r} needs field {e.args[0]!r}") from None


def rope_from_hf_config(cfg: dict, where: str = "config.json") -> RopeConfig:
    """RoPE parameters from an HF config dict, new (``rope_parameters``) or legacy (``rope_scaling``) format."""
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        return rope_from_dict(theta, params, max_pos, where)
    return rope_from_dict(float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling"), max_pos, where)


def hf_rope_scaling_json(cfg: dict, where: str = "config.json") -> Optional[str]:
    """``ModelSpec.rope_scaling_json`` for ``cfg``, reading transformers-5 ``rope_parameters`` too."""
    scaling = rope_from_hf_config(cfg, where).to_hf_rope_scaling()
    return None if scaling is None else json.dumps(scaling, sort_keys=True)


def sliding_windows_from_hf_config(cfg: dict, num_layers: int) -> tuple[Optional[int], ...]:
    """Per-block sliding window (None = full causal attention), following transformers' rules per family."""
    window = cfg.get("sliding_window")
    if window is None:
        return (None,) * num_layers
    window = int(window)
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if cfg.get("model_type") == "qwen2":
        # Qwen2 before layer_types: sliding only when enabled, and only from max_window_layers on.
        if not cfg.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(cfg.get("max_window_layers", num_layers))
        return tuple(window if i >= first else None for i in range(num_layers))
    if cfg.get("model_type") == "mistral":
        return (window,) * num_layers
    return (None,) * num_layers


def check_supported_hf_config(cfg: dict, where: str) -> None:
    """Raise on HF options this model does not implement (rather than silently computing something else)."""
    problems = []
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only silu)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if cfg.get("model_type") == "llama" and cfg.get("attention_bias"):
        problems.append("attention_bias=true on llama (it also biases o_proj)")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1")
    if problems:
        raise UserError(f"{where}: unsupported model options: " + "; ".join(problems))


def arch_from_hf_config(cfg: dict, where: str = "config.json") -> ArchConfig:
    """Architecture details from an HF config dict (raises on options we do not implement)."""
    check_supported_hf_config(cfg, where)
    num_layers = int(cfg["num_hidden_layers"])
    return ArchConfig(rope=rope_from_hf_config(cfg, where),
                      sliding_windows=sliding_windows_from_hf_config(cfg, num_layers))


def arch_from_spec(spec: ModelSpec) -> ArchConfig:
    """Architecture details implied by a spec alone (presets): its rope, no sliding windows."""
    return ArchConfig(rope=rope_from_dict(spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings,
                                          spec.source or "model spec"),
                      sliding_windows=(None,) * spec.num_layers)
