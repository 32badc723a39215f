"""PPO through the quickstart: the same update under one process and under an 8-process plan where all
six calls have different layouts (reallocation, pipelined generation, vocab-parallel log-probs), and
the memory policy's offload round trips."""

import json
import os

import pytest
import torch

from reallm.apps.quickstart import run

SIX_LAYOUTS = [  # every call in its own layout, as in the seed's PPO command
    "actor_train.parallel.model_parallel_size=4", "actor_train.parallel.data_parallel_size=2",
    "actor_gen.parallel.pipeline_parallel_size=2", "actor_gen.parallel.data_parallel_size=4",
    "critic_train.parallel.model_parallel_size=2", "critic_train.parallel.pipeline_parallel_size=2",
    "critic_train.parallel.data_parallel_size=2",
    "critic_inf.parallel.model_parallel_size=2", "critic_inf.parallel.data_parallel_size=2",
    "critic_inf.device_mesh=[4,5,6,7]",
    "ref_inf.parallel.model_parallel_size=2", "ref_inf.parallel.pipeline_parallel_size=2",
    "ref_inf.parallel.data_parallel_size=2", "ref_inf.parallel.use_sequence_parallel=True",
    "rew_inf.parallel.pipeline_parallel_size=4", "rew_inf.parallel.data_parallel_size=2",
]


def write_prompts(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{(i * 37) % 100}+{(i * 11) % 100}="}) + "\n")


def ppo_once(tmp_path, assets, trial, layout, greedy):
    data = tmp_path / "prompts.jsonl"
    write_prompts(data, 16)
    ckpt = assets["llama"]
    common = [f"actor.path={ckpt}", f"ref.path={ckpt}", f"critic.path={ckpt}", f"rew.path={ckpt}",
              f"dataset.path={data}", "dataset.train_bs_n_seqs=16", "dataset.max_prompt_len=16",
              "total_train_epochs=1", "ppo.max_new_tokens=5", "ppo.min_new_tokens=2", f"ppo.greedy={greedy}",
              "ppo.top_k=50", "ppo.top_p=0.95", "ppo.ppo_n_minibatches=2", "actor.optimizer.lr=1e-3",
              "critic.optimizer.lr=1e-3", "actor.optimizer.warmup_steps_proportion=0",
              "critic.optimizer.warmup_steps_proportion=0", "actor.gradient_checkpointing=False",
              "critic.gradient_checkpointing=False", "cluster=cpu", f"output_dir={tmp_path}",
              "experiment_name=ppo", f"trial_name={trial}"]
    assert run("ppo", common + layout) == 0
    from safetensors.torch import load_file

    return load_file(os.path.join(tmp_path, "ppo", trial, "checkpoints", "actor", "step1", "model.safetensors"))


@pytest.mark.parametrize("greedy", [True, False])
def test_ppo_update_same_under_eight_process_layouts(tmp_path, tiny_assets, greedy):
    from safetensors.torch import load_file

    start = load_file(os.path.join(tiny_assets["llama"], "model.safetensors"))
    one = ppo_once(tmp_path, tiny_assets, "one", ["allocation_mode=d1p1m1", "n_gpus_per_node=1"], greedy)
    many = ppo_once(tmp_path, tiny_assets, "many", ["allocation_mode=manual", "n_gpus_per_node=8", *SIX_LAYOUTS],
                    greedy)
    d1 = torch.cat([(one[k] - start[k]).flatten() for k in sorted(start)])
    d8 = torch.cat([(many[k] - start[k]).flatten() for k in sorted(start)])
    moved = d1.abs() > 1e-6
    assert moved.float().mean() > 0.5  # the step did update the actor
    signs = (torch.sign(d1[moved]) == torch.sign(d8[moved])).float().mean()
    rel = (d1 - d8).norm() / d1.norm()
    assert signs >= 0.99 and rel <= 0.05, (float(signs), float(rel))
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "ppo", "many", "metrics.jsonl"))]
    assert rows[0]["realloc_actor_gen_bytes"] > 0 and rows[0]["realloc_critic_inf_bytes"] > 0

