"""Typed experiment configs: the schema behind ``python3 -m reallm.apps.quickstart EXP key=value ...``.

These are Hydra structured configs, so they stay mutable (Hydra applies overrides to them), use
``Enum`` for choices (Hydra rejects ``Literal``) and ``Optional[...]`` where ``null`` is allowed.
After parsing, ``reallm.config.resolve`` turns them into frozen values (model specs, the dataflow
graph, the cluster); nothing downstream reads these dataclasses except through that step.

Field names and defaults follow ReaL's quickstart so its commands run as written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional


class Mode(enum.Enum):
    local = "local"  # one machine: the launcher forks/spawns one process per device
    torchrun = "torchrun"  # several nodes: each process started by torchrun


class RecoverMode(enum.Enum):
    disabled = "disabled"
    auto = "auto"  # resume from the latest complete recovery state if there is one
    save = "save"  # write recovery state, never resume
    resume = "resume"  # must resume; error if nothing to resume from


class OptimizerType(enum.Enum):
    adam = "adam"
    empty = "empty"  # a model that is never trained (ref, reward)


class LRScheduler(enum.Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class ModelType:
    _class: Optional[str] = None
    """Model family: llama, llama3, codellama, mistral, qwen2. May be omitted when ``path`` is given."""
    size: Optional[float] = None
    """Size in billions of parameters; selects a preset when no checkpoint is at hand."""
    is_critic: bool = False
    """A critic / reward model: one output per token instead of the LM head."""


@dataclass
class OptimizerConfig:
    type: OptimizerType = OptimizerType.adam
    """``adam`` (AdamW) or ``empty`` for a frozen model."""
    lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr`` (cosine and linear schedules)."""
    lr_scheduler_type: LRScheduler = LRScheduler.cosine
    warmup_steps_proportion: float = 0.02
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    offload: bool = False
    """Keep Adam states in host memory between train calls."""
    zero_stage: int = 0
    """0: every dp rank keeps the whole optimizer state; 1: Adam states sharded over dp (ZeRO-1)."""


@dataclass
class ModelConfig:
    type: ModelType = field(default_factory=ModelType)
    path: Optional[str] = None
    """HF checkpoint directory. Its config.json wins over ``type.*`` when both are given."""
    gradient_checkpointing: bool = True
    bf16: bool = True
    """bf16 weights and activations with fp32 master weights on GPU; ignored on CPU (fp32)."""
    compile: bool = True
    """On GPU without tensor parallelism, run the transformer blocks as torch.compile'd regions (fused
    norms, rotary, SwiGLU and residuals; the first call of a new shape pays the compilation)."""
    train_cuda_graphs: bool = True
    """On GPU with tp = pp = 1 and compiled blocks, replay train micro-batches' forward and backward from
    CUDA graphs per token bucket (``reallm.model.graphs.TrainGraphs``): host-bound micro-batches (a few
    thousand tokens) run at device speed (1.1-2x faster measured). Only where the train call has its
    devices to itself (``keeps_train_resident``: its state is then never offloaded between steps); holds
    d·P bytes of static gradients and one micro-batch's activations per graphed bucket between calls, which
    the planner counts."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    offload: bool = False
    """Keep this (frozen) model's weights in host memory between its calls."""


@dataclass
class ParallelismConfig:
    data_parallel_size: int = 1
    model_parallel_size: int = 1
    """Tensor-parallel degree (ReaL's name)."""
    pipeline_parallel_size: int = 1
    use_sequence_parallel: bool = False


@dataclass
class MFCConfig:
    """Allocation of one model function call (used when ``allocation_mode=manual``)."""

    parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    device_mesh: Optional[list[int]] = None
    """Global device ids, e.g. ``[0,1,2,3]``. Default: all devices of the cluster."""
    n_mbs: Optional[int] = None
    """Micro-batches. Default: 1 without pp, 2·pp for training, pp for inference and generation."""


@dataclass
class PromptAnswerDatasetConfig:
    train_path: Optional[str] = None
    """json/jsonl with ``{"prompt", "answer"}`` per entry."""
    valid_path: Optional[str] = None
    max_seqlen: int = 1024
    """Longer prompt+answer texts are truncated."""
    train_bs_n_seqs: int = 256
    valid_bs_n_seqs: int = 256


@dataclass
class PairedComparisonDatasetConfig:
    train_path: Optional[str] = None
    """json/jsonl with ``{"prompt", "pos_answers": [...], "neg_answers": [...]}`` per entry."""
    valid_path: Optional[str] = None
    max_pairs_per_prompt: int = 2
    max_seqlen: int = 1024
    train_bs_n_seqs: int = 256
    """Prompts per step; each yields up to 2·max_pairs_per_prompt sequences."""
    valid_bs_n_seqs: int = 256


@dataclass
class PromptOnlyDatasetConfig:
    path: Optional[str] = None
    """json/jsonl with ``{"prompt"}`` per entry."""
    valid_path: Optional[str] = None
    max_prompt_len: int = 256
    train_bs_n_seqs: int = 256
    valid_bs_n_seqs: int = 256


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    min_new_tokens: int = 256
    greedy: bool = False
    top_p: float = 0.9
    top_k: int = 200
    temperature: float = 1.0


@dataclass
class PPOHyperparameters:
    # generation (the seed writes them as ppo.top_p, ppo.max_new_tokens)
    max_new_tokens: int = 256
    min_new_tokens: int = 256
    greedy: bool = False
    top_p: float = 0.9
    top_k: int = 200
    temperature: float = 1.0
    force_no_logits_mask: bool = False
    """Do not record which tokens top-k/top-p removed; training then uses the full vocabulary."""
    # training
    ppo_n_minibatches: int = 4
    kl_ctl: float = 0.1
    use_adaptive_kl_ctl: bool = False
    adaptive_kl_target: float = 6.0
    adaptive_kl_horizon: float = 10000.0
    discount: float = 1.0
    gae_lambda: float = 1.0
    eps_clip: float = 0.2
    value_eps_clip: float = 0.2
    max_reward_clip: float = 20.0
    reward_output_scaling: float = 1.0
    reward_output_bias: float = 0.0
    early_stop_imp_ratio: float = 5.0
    adv_norm: bool = True
    value_norm: bool = True
    value_norm_beta: float = 0.99995
    value_norm_eps: float = 1e-5
    reward_fn: Optional[str] = None
    """Import path ``module:function(prompt, completion) -> float`` of a rule-based reward; replaces
    the reward model (no ``rew`` model or ``rew_inf`` call then)."""


@dataclass
class MemoryConfig:
    offload_train_state: bool = True
    """While a model's generation / inference call runs on devices that also hold its training state, keep
    that state in host memory (pinned on GPU): weights, gradients and Adam states when the call has a
    replica of its own; gradients and Adam states when it runs on the training weights (same layout)."""
    offload_idle_train_states: bool = False
    """Also keep the training state of every *other* model (e.g. the critic's during actor_gen) in host
    memory while a call runs on its devices: the least device memory, at the price of host transfers."""
    offload_frozen_models: bool = True
    """Keep frozen models (ref, reward) that share devices with other models in host memory between calls."""


@dataclass
class CommonConfig:
    experiment_name: str = "reallm"
    trial_name: str = "trial"
    mode: Mode = Mode.local
    n_nodes: int = 1
    n_gpus_per_node: int = 8
    """Devices per node: GPUs, or worker processes on a CPU cluster."""
    cluster: str = "auto"
    """Cluster spec: a name under configs/cluster/ (h100, a100, cpu), a YAML path, or ``auto``
    (h100 when this machine has an NVIDIA GPU, else cpu). n_nodes / n_gpus_per_node override it."""
    seed: int = 1
    output_dir: str = "./outputs"
    recover_mode: RecoverMode = RecoverMode.disabled
    allocation_mode: str = "manual"
    """manual | heuristic | search | pipe_data | pipe_model | d{D}p{P}m{M} (letters in any order)."""
    total_train_epochs: int = 1
    save_freq_steps: Optional[int] = None
    save_freq_epochs: Optional[int] = None
    eval_freq_epochs: Optional[int] = 1
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class SFTConfig(CommonConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    allocation: MFCConfig = field(default_factory=MFCConfig)
    dataset: PromptAnswerDatasetConfig = field(default_factory=PromptAnswerDatasetConfig)


@dataclass
class RWConfig(CommonConfig):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(type=ModelType(is_critic=True)))
    allocation: MFCConfig = field(default_factory=MFCConfig)
    dataset: PairedComparisonDatasetConfig = field(default_factory=PairedComparisonDatasetConfig)


@dataclass
class DPOConfig(CommonConfig):
    actor: ModelConfig = field(default_factory=ModelConfig)
    ref: ModelConfig = field(default_factory=lambda: ModelConfig(optimizer=OptimizerConfig(type=OptimizerType.empty)))
    actor_train: MFCConfig = field(default_factory=MFCConfig)
    ref_inf: MFCConfig = field(default_factory=MFCConfig)
    dataset: PairedComparisonDatasetConfig = field(default_factory=PairedComparisonDatasetConfig)
    beta: float = 0.1


@dataclass
class PPOConfig(CommonConfig):
    actor: ModelConfig = field(default_factory=ModelConfig)
    critic: ModelConfig = field(default_factory=lambda: ModelConfig(type=ModelType(is_critic=True)))
    ref: ModelConfig = field(default_factory=lambda: ModelConfig(optimizer=OptimizerConfig(type=OptimizerType.empty)))
    rew: ModelConfig = field(default_factory=lambda: ModelConfig(
        type=ModelType(is_critic=True), optimizer=OptimizerConfig(type=OptimizerType.empty)))
    actor_gen: MFCConfig = field(default_factory=MFCConfig)
    actor_train: MFCConfig = field(default_factory=MFCConfig)
    critic_inf: MFCConfig = field(default_factory=MFCConfig)
    critic_train: MFCConfig = field(default_factory=MFCConfig)
    ref_inf: MFCConfig = field(default_factory=MFCConfig)
    rew_inf: MFCConfig = field(default_factory=MFCConfig)
    dataset: PromptOnlyDatasetConfig = field(default_factory=PromptOnlyDatasetConfig)
    ppo: PPOHyperparameters = field(default_factory=PPOHyperparameters)


@dataclass
class GenConfig(CommonConfig):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(optimizer=OptimizerConfig(type=OptimizerType.empty)))
    allocation: MFCConfig = field(default_factory=MFCConfig)
    dataset: PromptOnlyDatasetConfig = field(default_factory=PromptOnlyDatasetConfig)
    gen: GenerationConfig = field(default_factory=GenerationConfig)


EXPERIMENTS = {"sft": SFTConfig, "rw": RWConfig, "dpo": DPOConfig, "ppo": PPOConfig, "gen": GenConfig}

#: Per experiment: model role → the config field holding it.
ROLES = {
    "sft": {"default": "model"},
    "rw": {"default": "model"},
    "gen": {"default": "model"},
    "dpo": {"actor": "actor", "ref": "ref"},
    "ppo": {"actor": "actor", "critic": "critic", "ref": "ref", "rew": "rew"},
}
