"""Dataflow graphs of every experiment: nodes, data edges from keys, parameter-version edges."""

import pytest

from reallm.config.parse import parse_experiment
from reallm.config.resolve import resolve
from reallm.dataflow import Call, build_graph, calls_for, dataset_keys, topological_order
from reallm.errors import UserError


def graph(exp, *overrides):
    return build_graph(calls_for(exp, parse_experiment(exp, list(overrides))))


def data_edges(g):
    return {(u, v) for u, v, k in g.edges(data="kind") if k == "data"}


def test_ppo_six_calls_and_edges():
    g = graph("ppo", "dataset.train_bs_n_seqs=128", "ppo.max_new_tokens=256", "dataset.max_prompt_len=256")
    assert set(g.nodes) == {"actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"}
    kinds = {n: g.nodes[n]["call"].kind for n in g.nodes}
    assert kinds == {"actor_gen": "generate", "rew_inf": "inference", "ref_inf": "inference",
                     "critic_inf": "inference", "actor_train": "train", "critic_train": "train"}
    roles = {n: g.nodes[n]["call"].role for n in g.nodes}
    assert roles["rew_inf"] == "rew" and roles["critic_train"] == "critic" and roles["actor_gen"] == "actor"
    assert data_edges(g) == {
        ("actor_gen", "rew_inf"), ("actor_gen", "ref_inf"), ("actor_gen", "critic_inf"),
        ("actor_gen", "actor_train"), ("actor_gen", "critic_train"),
        ("rew_inf", "actor_train"), ("rew_inf", "critic_train"), ("ref_inf", "actor_train"),
        ("ref_inf", "critic_train"), ("critic_inf", "actor_train"), ("critic_inf", "critic_train")}
    assert g.edges["ref_inf", "actor_train"]["keys"] == ("packed_ref_logprobs",)
    assert "packed_logits_mask" in g.edges["actor_gen", "actor_train"]["keys"]
    assert "packed_logits_mask" not in g.edges["actor_gen", "critic_train"]["keys"]
    assert dataset_keys(g) == {"packed_prompts"}
    # parameter versions: the critic's inference precedes its training (already a data edge), and across
    # steps the first call on each trained model waits for its train call of the previous step
    assert set(g.graph["cross_step"]) == {("actor_train", "actor_gen", "actor"), ("critic_train", "critic_inf", "critic")}
    c = g.nodes["actor_gen"]["call"]
    assert c.n_seqs == 128 and c.max_seqlen == 512 and c.max_new_tokens == 256
    assert g.nodes["actor_train"]["call"].n_minibatches == 4
    order = topological_order(g)
    assert order[0] == "actor_gen" and set(order[-2:]) == {"actor_train", "critic_train"}


def test_ppo_rule_based_reward_has_no_reward_model():
    cfg = parse_experiment("ppo", ["ppo.reward_fn=reallm.assets:addition_reward"])
    g = build_graph(calls_for("ppo", cfg))
    assert "rew_inf" not in g.nodes and "rewards" in g.nodes["actor_gen"]["call"].outputs
    assert ("actor_gen", "actor_train") in data_edges(g)


def test_dpo():
    g = graph("dpo", "dataset.train_bs_n_seqs=8", "dataset.max_pairs_per_prompt=2")
    assert set(g.nodes) == {"ref_inf", "actor_train"}
    assert data_edges(g) == {("ref_inf", "actor_train")}
    assert g.nodes["actor_train"]["call"].n_seqs == 8 * 2 * 2
    assert g.graph["cross_step"] == [("actor_train", "actor_train", "actor")]


@pytest.mark.parametrize("exp,kind", [("sft", "train"), ("rw", "train"), ("gen", "generate")])
def test_single_call_experiments(exp, kind):
    g = graph(exp)
    assert g.number_of_nodes() == 1 and g.number_of_edges() == 0
    (n,) = g.nodes
    assert g.nodes[n]["call"].kind == kind and g.nodes[n]["call"].role == "default"


def test_param_edge_when_no_data_edge():
    calls = [Call("a_inf", "a", "inference", ("x",), ("y",), 4, 8),
             Call("a_train", "a", "train", ("x",), (), 4, 8)]
    g = build_graph(calls)
    assert g.edges["a_inf", "a_train"]["kind"] == "param"


def test_graph_errors():
    with pytest.raises(UserError, match="produced by both"):
        build_graph([Call("a", "m", "inference", (), ("y",), 1, 1), Call("b", "m", "inference", (), ("y",), 1, 1)])
    with pytest.raises(UserError, match="cycle"):
        build_graph([Call("a", "m", "inference", ("z",), ("y",), 1, 1), Call("b", "n", "inference", ("y",), ("z",), 1, 1)])
    with pytest.raises(UserError, match="kind"):
        Call("a", "m", "train_step", (), (), 1, 1)


def test_resolve_specs_from_presets_and_config_json(tmp_path):
    import json
    exp = resolve("ppo", parse_experiment("ppo", ["actor.type._class=llama", "actor.type.size=70",
                                                  "critic.type._class=llama", "critic.type.size=7",
                                                  "critic.type.is_critic=True", "ref.type._class=llama",
                                                  "ref.type.size=70", "rew.type._class=llama", "rew.type.size=7"]))
    assert exp.models["actor"].num_kv_heads == 8 and 68e9 < exp.models["actor"].num_params < 70e9
    assert exp.models["critic"].is_critic and exp.models["critic"].num_head_params == 4096 * 2 + 1
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64,
                                               "intermediate_size": 128, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "vocab_size": 300,
                                               "tie_word_embeddings": False}))
    sft = resolve("sft", parse_experiment("sft", [f"model.path={d}", "n_gpus_per_node=1", "cluster=cpu"]))
    s = sft.models["default"]
    assert (s.family, s.num_layers, s.qkv_bias, s.head_dim, s.vocab_size) == ("qwen2", 2, True, 16, 300)
    with pytest.raises(UserError, match="no preset"):
        resolve("sft", parse_experiment("sft", ["model.type._class=llama", "model.type.size=3"]))
    with pytest.raises(UserError, match="path"):
        resolve("sft", parse_experiment("sft", []))
