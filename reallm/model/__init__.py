"""The model core, single process: a LLaMA-family transformer on packed sequences, HF checkpoints in and out,
generation with a static KV cache, log-probs and losses, AdamW with fp32 masters.

Read in this order: ``transformer`` (the model and ``StageSpec``), ``attention`` (packed and decode
attention), ``arch`` (rope / sliding windows from config.json), ``hf_io`` (load with a per-parameter
slice rule; save as ``*ForCausalLM`` / ``*ForTokenClassification``), ``generate``, ``losses``, ``optim``,
``train``. No parallelism lives here: ``reallm.parallel`` swaps the linears and the embedding/head.

The generation entry point is ``reallm.model.generate.generate``; it is not re-exported here, because a
package attribute named ``generate`` would shadow the submodule of that name.
"""

from reallm.model.arch import ArchConfig, RopeConfig, arch_from_hf_config, arch_from_spec
from reallm.model.attention import AttnBackend, PackedSeqs
from reallm.model.generate import (
    GenerationConfig,
    GenerationOutput,
    keyed_uniforms,
    load_tokenizer,
    sampling_step,
    tokenize_prompts,
)
from reallm.model.hf_io import (
    CheckpointReader,
    HFModelInfo,
    load_hf_model,
    load_hf_weights,
    read_hf_model,
    save_hf_checkpoint,
    save_hf_model,
)
from reallm.model.losses import LossFn, packed_logprobs, sft_loss, target_logprobs
from reallm.model.optim import MixedPrecisionAdamW, OptimizerSettings, lr_at
from reallm.model.train import forward_backward, sft_micro_batch, train_step
from reallm.model.transformer import KVCache, StageSpec, Transformer, pack_sequences

__all__ = [
    "ArchConfig", "AttnBackend", "CheckpointReader", "GenerationConfig", "GenerationOutput", "HFModelInfo", "KVCache",
    "LossFn", "MixedPrecisionAdamW", "OptimizerSettings", "PackedSeqs", "RopeConfig", "StageSpec", "Transformer",
    "arch_from_hf_config", "arch_from_spec", "forward_backward", "keyed_uniforms", "load_hf_model",
    "load_hf_weights", "load_tokenizer", "lr_at", "pack_sequences", "packed_logprobs", "read_hf_model",
    "sampling_step", "save_hf_checkpoint", "save_hf_model", "sft_loss", "sft_micro_batch", "target_logprobs",
    "tokenize_prompts", "train_step",
]
