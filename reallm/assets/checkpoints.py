"""Tiny random HF checkpoints, one per supported family plus the layouts tests need.

Each checkpoint directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32)
and the tokenizer files, so both ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it offline.

Initialisation is deliberately *not* HF's: HF's defaults (std 0.02, norms at 1, biases at 0) give near-uniform
logits and leave norm weights and q/k/v biases invisible, so a layout bug that drops a bias or swaps two
norms would pass a numerical comparison. Here weights have std ``INITIALIZER_RANGE`` (logit std about 1),
norm weights are ``1 + N(0, 0.1)`` and biases ``N(0, INITIALIZER_RANGE)``.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, Optional

#: Std of the random weights; ~1/sqrt(hidden) so random logits have std about 1 (distinct, not one-hot).
INITIALIZER_RANGE = 0.125
NORM_WEIGHT_STD = 0.1
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class TinyModel:
    """Shape of one tiny checkpoint (vocab and special ids come from the tokenizer)."""

    name: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False
    #: LLaMA-2 uses 1e-5, Qwen2/Mistral 1e-6; differing values catch code that hard-codes one.
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


#: Every checkpoint ``make_tiny_assets`` writes. GQA everywhere (kv heads < heads) so head grouping is tested.
TINY_MODELS: tuple[TinyModel, ...] = (
    TinyModel("llama", "llama", 4, 64, 128, 4, 2, rms_norm_eps=1e-5),
    # Qwen2 puts a bias on q/k/v; untied here although small real Qwen2s tie.
    TinyModel("qwen2", "qwen2", 4, 64, 160, 4, 2),
    TinyModel("mistral", "mistral", 4, 64, 192, 4, 2),
    TinyModel("llama_tied", "llama", 4, 64, 128, 4, 2, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # For tensor parallelism 3: 9 heads, 3 kv heads, head_dim 8, intermediate and vocab divisible by 3;
    # 6 layers so pipeline sizes 2, 3 and 6 split evenly.
    TinyModel("llama_9h", "llama", 6, 72, 144, 9, 3, rms_norm_eps=1e-5),
)


def hf_config(m: TinyModel, vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
              max_position_embeddings: int) -> Any:
    """The transformers config object for ``m``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
    if m.family == "llama":
        return LlamaConfig(**common, head_dim=m.head_dim, attention_bias=False, mlp_bias=False)
    if m.family == "mistral":
        # No sliding window: sequences here are far shorter than any window, and a window would be one more
        # thing the executor has to match for no test value.
        return MistralConfig(**common, head_dim=m.head_dim, sliding_window=None)
    if m.family == "qwen2":
        # Qwen2Config has no head_dim: it is always hidden_size // num_attention_heads.
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown family {m.family!r}")


def _seed_for(seed: int, name: str) -> int:
    # crc32, not hash(): str hashes are salted per process and would break cross-run determinism.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def write_checkpoint(m: TinyModel, out_dir: str, *, seed: int, vocab_size: int, bos_id: int, eos_id: int,
                     pad_id: int, max_position_embeddings: int, tokenizer_dir: Optional[str] = None) -> list[str]:
    """Build ``m`` with random weights and ``save_pretrained`` it (safetensors); returns the files written."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    cfg = hf_config(m, vocab_size, bos_id, eos_id, pad_id, max_position_embeddings)
    # fork_rng: seed locally without disturbing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(seed, m.name))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + NORM_WEIGHT_STD * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.normal_(0.0, INITIALIZER_RANGE)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    os.makedirs(out_dir, exist_ok=True)
    # save_pretrained shows a "Writing model shards" bar; restore the user's setting afterwards.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if tokenizer_dir is not None:
        for f in sorted(os.listdir(tokenizer_dir)):
            shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(out_dir, f))
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir))
