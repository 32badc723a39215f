"""Experiment configs: the seed's keys, defaults, and every kind of bad input."""

import re
from pathlib import Path

import pytest

from reallm.config.parse import parse_experiment
from reallm.config.schema import Mode, RecoverMode
from reallm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seed" / "quickstart.rst"  # beside the checkout (CI, developers)
SEED_COPY = REPO / "tests" / "data" / "seed_commands.txt"  # the same commands, for a lone clone


def _commands_of_rst(text: str) -> dict[str, list[str]]:
    cmds = {}
    for block in re.findall(r"\$ python3 -m reallm\.apps\.quickstart (.*?)(?:\n\n|\Z)", text, re.S):
        words = block.replace("\\\n", " ").split()
        cut = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
        cmds[words[0]] = words[1:cut]
    return cmds


def _commands_of_copy(text: str) -> dict[str, list[str]]:
    cmds = {}
    for line in text.splitlines():
        if line.startswith("python3 -m reallm.apps.quickstart "):
            words = line.split()[3:]
            cmds[words[0]] = words[1:]
    return cmds


def seed_commands() -> dict[str, list[str]]:
    """The four quickstart commands of the seed document, as {experiment: [key=value ...]}."""
    if SEED.exists():
        return _commands_of_rst(SEED.read_text())
    return _commands_of_copy(SEED_COPY.read_text())


def test_seed_copy_matches_seed_document():
    if SEED.exists():
        assert _commands_of_copy(SEED_COPY.read_text()) == _commands_of_rst(SEED.read_text())


def test_seed_document_has_four_commands():
    assert set(seed_commands()) == {"sft", "rw", "dpo", "ppo"}


@pytest.mark.parametrize("exp", ["sft", "rw", "dpo", "ppo"])
def test_seed_commands_parse(exp):
    overrides = [o.replace("$SFT_MODEL_PATH", "").replace("$RW_MODEL_PATH", "") for o in seed_commands()[exp]]
    cfg = parse_experiment(exp, overrides)
    assert cfg.mode is Mode.local
    assert cfg.allocation_mode == "manual"
    if exp == "ppo":
        assert cfg.save_freq_steps is None
        assert cfg.ppo.top_k == 1000 and cfg.ppo.top_p == 0.9 and cfg.ppo.reward_output_scaling == 10.0
        assert cfg.actor_gen.parallel.pipeline_parallel_size == 2
        assert cfg.actor.path is None  # $SFT_MODEL_PATH unset → empty → not given
        assert cfg.critic.type.is_critic is True
    if exp == "sft":
        assert cfg.model.type._class == "llama" and cfg.model.type.size == 7
        assert cfg.allocation.parallel.use_sequence_parallel is True
        assert cfg.dataset.train_bs_n_seqs == 512


def test_reference_defaults():
    ppo = parse_experiment("ppo", [])
    p = ppo.ppo
    assert (p.ppo_n_minibatches, p.kl_ctl, p.use_adaptive_kl_ctl, p.discount, p.gae_lambda) == (4, 0.1, False, 1.0, 1.0)
    assert (p.eps_clip, p.value_eps_clip, p.max_reward_clip, p.reward_output_scaling) == (0.2, 0.2, 20.0, 1.0)
    assert (p.reward_output_bias, p.early_stop_imp_ratio, p.adv_norm, p.value_norm) == (0.0, 5.0, True, True)
    assert (p.max_new_tokens, p.min_new_tokens, p.greedy, p.top_p, p.top_k, p.temperature) == (256, 256, False, 0.9, 200, 1.0)
    assert p.value_norm_beta == 0.99995 and p.value_norm_eps == 1e-5
    o = ppo.actor.optimizer
    assert (o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.warmup_steps_proportion, o.min_lr_ratio) == \
        (1e-5, 0.05, 0.9, 0.95, 1e-5, 0.02, 0.0)
    assert ppo.actor.gradient_checkpointing is True
    assert ppo.n_nodes == 1 and ppo.n_gpus_per_node == 8 and ppo.seed == 1
    assert ppo.output_dir == "./outputs" and ppo.recover_mode is RecoverMode.disabled
    assert ppo.dataset.max_prompt_len == 256
    assert parse_experiment("sft", []).dataset.max_seqlen == 1024
    assert parse_experiment("rw", []).dataset.max_pairs_per_prompt == 2
    assert parse_experiment("dpo", []).beta == 0.1


@pytest.mark.parametrize("override,needle", [
    ("nonsense=1", "unknown key 'nonsense'"),
    ("actor.typo=1", "unknown key 'actor.typo'"),
    ("n_nodes=two", "n_nodes"),
    ("ppo.kl_ctl=abc", "ppo.kl_ctl"),
    ("mode=ray", "mode"),
    ("+extra=1", "not allowed"),
    ("++extra=1", "not allowed"),
    ("~seed", "not allowed"),
    ("noequals", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_experiment("ppo", [override])


def test_null_and_lists():
    cfg = parse_experiment("ppo", ["save_freq_steps=null", "actor_gen.device_mesh=[0,1,2,3]", "actor_gen.n_mbs=3"])
    assert cfg.save_freq_steps is None and cfg.actor_gen.device_mesh == [0, 1, 2, 3] and cfg.actor_gen.n_mbs == 3


def test_yaml_unknown_key_names_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("experiment: sft\nmodel: {typo: 1}\n")
    with pytest.raises(UserError, match="x.yaml.*model.typo"):
        parse_experiment("sft", [], yaml_path=str(f))
    f.write_text("experiment: sft\nmodel: [unclosed\n")
    with pytest.raises(UserError, match=r"x.yaml:\d+: malformed YAML"):
        parse_experiment("sft", [], yaml_path=str(f))
