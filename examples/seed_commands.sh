#!/usr/bin/env bash
# The seed document's four commands (shared/seed/quickstart.rst) on this machine: paths point at the tiny
# assets (`python -m reallm.apps.quickstart` reads them relative to the repo root), epochs and generation
# lengths reduced, parallel degrees fitted to the tiny model (4 heads, 2 kv heads, 4 layers) on 8 CPU
# processes. Every other key is the seed's, except SFT's learning rate: the seed's default (1e-5, meant
# for a pretrained 7B model) barely moves the random tiny model in 19 steps (answer loss 6.34 -> 6.24), so
# SFT runs at 3e-3 as the tiny demo does. Run from the repository root after `make demo` (or
# `python -m reallm.assets assets`). At the end, examples/check_seed_sft.py judges the SFT checkpoint
# with transformers alone (held-out answer loss clearly below the starting model's).
set -euo pipefail
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
last() { ls -d "$1"/step* | sort -t p -k 2 -n | tail -1; }

$PY -m reallm.apps.quickstart sft \
    experiment_name=quickstart-sft trial_name=my-trial allocation_mode=manual mode=local \
    total_train_epochs=1 save_freq_steps=50 eval_freq_epochs=1 \
    model.type._class=llama model.type.is_critic=False model.path=assets/checkpoints/llama \
    model.gradient_checkpointing=True model.optimizer.type=adam model.optimizer.lr=3e-3 \
    dataset.train_path=assets/data/sft_train.jsonl dataset.valid_path=assets/data/sft_valid.jsonl \
    dataset.max_seqlen=1024 \
    allocation.parallel.pipeline_parallel_size=1 allocation.parallel.model_parallel_size=2 \
    allocation.parallel.data_parallel_size=4 allocation.parallel.use_sequence_parallel=True \
    dataset.train_bs_n_seqs=512 dataset.valid_bs_n_seqs=512
SFT_MODEL_PATH=$(last outputs/quickstart-sft/my-trial/checkpoints/default)

$PY -m reallm.apps.quickstart rw \
    experiment_name=quickstart-rw trial_name=my-trial mode=local allocation_mode=manual \
    total_train_epochs=1 save_freq_steps=5 eval_freq_epochs=1 \
    model.type._class=llama model.type.is_critic=True model.path=$SFT_MODEL_PATH \
    allocation.parallel.pipeline_parallel_size=2 allocation.parallel.model_parallel_size=2 \
    allocation.parallel.data_parallel_size=2 allocation.parallel.use_sequence_parallel=True \
    model.gradient_checkpointing=True \
    dataset.train_path=assets/data/rw_train.jsonl dataset.valid_path=assets/data/rw_valid.jsonl \
    dataset.max_pairs_per_prompt=2 dataset.max_seqlen=1024 dataset.train_bs_n_seqs=512 dataset.valid_bs_n_seqs=512
RW_MODEL_PATH=$(last outputs/quickstart-rw/my-trial/checkpoints/default)

$PY -m reallm.apps.quickstart dpo \
    experiment_name=quickstart-dpo trial_name=my-trial allocation_mode=manual mode=local \
    total_train_epochs=1 save_freq_steps=5 \
    actor.type._class=llama actor.type.is_critic=False actor.path=$SFT_MODEL_PATH \
    actor_train.parallel.pipeline_parallel_size=1 actor_train.parallel.model_parallel_size=4 \
    actor_train.parallel.data_parallel_size=2 actor_train.parallel.use_sequence_parallel=True \
    ref.type._class=llama ref.type.is_critic=False ref.path=$SFT_MODEL_PATH \
    ref_inf.parallel.pipeline_parallel_size=1 ref_inf.parallel.model_parallel_size=2 \
    ref_inf.parallel.data_parallel_size=4 ref_inf.parallel.use_sequence_parallel=True \
    dataset.train_path=assets/data/rw_train.jsonl dataset.max_pairs_per_prompt=2 dataset.max_seqlen=1024 \
    dataset.train_bs_n_seqs=512 dataset.valid_bs_n_seqs=512

# tp=8 of the seed becomes tp=4·dp=2 (the tiny model has 4 heads); 256 new tokens become 8.
$PY -m reallm.apps.quickstart ppo \
    experiment_name=debug-quickstart-ppo trial_name=20240613-1 total_train_epochs=1 allocation_mode=manual \
    save_freq_steps=null \
    actor.type._class=llama actor.type.is_critic=False actor.path=$SFT_MODEL_PATH actor.gradient_checkpointing=True \
    critic.type._class=llama critic.type.is_critic=True critic.path=$RW_MODEL_PATH critic.gradient_checkpointing=True \
    ref.type._class=llama ref.type.is_critic=False ref.path=$SFT_MODEL_PATH \
    rew.type._class=llama rew.type.is_critic=True rew.path=$RW_MODEL_PATH \
    dataset.path=assets/data/ppo_train.jsonl dataset.max_prompt_len=256 dataset.train_bs_n_seqs=128 \
    ppo.max_new_tokens=8 ppo.min_new_tokens=8 ppo.ppo_n_minibatches=4 ppo.kl_ctl=0.1 \
    ppo.force_no_logits_mask=False ppo.value_eps_clip=0.2 ppo.reward_output_scaling=10.0 \
    ppo.adv_norm=True ppo.value_norm=True ppo.top_p=0.9 ppo.top_k=1000 \
    actor_train.parallel.model_parallel_size=4 actor_train.parallel.pipeline_parallel_size=1 \
    actor_train.parallel.data_parallel_size=2 \
    actor_gen.parallel.model_parallel_size=1 actor_gen.parallel.pipeline_parallel_size=2 \
    actor_gen.parallel.data_parallel_size=4 \
    critic_train.parallel.model_parallel_size=4 critic_train.parallel.pipeline_parallel_size=1 \
    critic_train.parallel.data_parallel_size=2 \
    critic_inf.parallel.model_parallel_size=4 critic_inf.parallel.pipeline_parallel_size=2 \
    critic_inf.parallel.data_parallel_size=1 \
    ref_inf.parallel.model_parallel_size=4 ref_inf.parallel.pipeline_parallel_size=2 \
    ref_inf.parallel.data_parallel_size=1 \
    rew_inf.parallel.model_parallel_size=1 rew_inf.parallel.pipeline_parallel_size=4 \
    rew_inf.parallel.data_parallel_size=2
$PY examples/check_seed_sft.py outputs/quickstart-sft/my-trial assets/checkpoints/llama \
    --valid assets/data/sft_valid.jsonl --tokenizer assets/tokenizer
echo "seed commands done: outputs/quickstart-sft, outputs/quickstart-rw, outputs/quickstart-dpo, outputs/debug-quickstart-ppo"
