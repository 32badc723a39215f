"""Placements, allocation modes and plan.json: layouts, round-trips and validation messages."""

import json

import pytest

from planner.allocation import make_plan, parse_symmetric
from reallm.config.parse import parse_experiment
from reallm.config.resolve import resolve
from reallm.errors import PlanError, UserError
from reallm.placement import Placement
from reallm.plan import PLAN_VERSION, load_plan, plan_from_dict

SEED_PPO = {  # call: (tp, pp, dp) from the seed's PPO command
    "actor_train": (8, 1, 1), "actor_gen": (1, 2, 4), "critic_train": (8, 1, 1),
    "critic_inf": (4, 2, 1), "ref_inf": (4, 2, 1), "rew_inf": (1, 4, 2)}


def ppo_plan(*overrides):
    cfg = parse_experiment("ppo", list(overrides), yaml_path="configs/ppo.yaml")
    return make_plan(resolve("ppo", cfg))


def test_rank_layout_is_a_pp_dp_tp_reshape():
    p = Placement(tuple(range(10, 18)), dp=2, tp=2, pp=2)
    for i, (dev, c) in enumerate(p.coords()):
        assert dev == 10 + i and p.device_at(*c) == dev and p.coord(dev) == c
        assert i == (c.pp * 2 + c.dp) * 2 + c.tp
    assert p.tp_group(12) == (12, 13) and p.dp_group(12) == (10, 12) and p.pp_group(12) == (12, 16)
    assert sorted(d for g in p.tp_groups() for d in g) == list(range(10, 18))
    assert p.dp_heads() == (14, 16)
    with pytest.raises(UserError, match="dp\\*tp\\*pp"):
        Placement((0, 1, 2), dp=2)
    with pytest.raises(UserError, match="twice"):
        Placement((0, 0), dp=2)


def test_seed_ppo_manual_plan(repo_root):
    plan = ppo_plan("allocation_mode=manual")
    assert plan.cluster.num_devices == 8
    for name, (tp, pp, dp) in SEED_PPO.items():
        p = plan.placements[name]
        assert (p.tp, p.pp, p.dp, p.devices) == (tp, pp, dp, tuple(range(8))), name
    assert plan.placements["actor_gen"].num_micro_batches == 2  # pp for generation
    assert plan.placements["rew_inf"].num_micro_batches == 4


def test_round_trip_is_lossless(tmp_path):
    plan = ppo_plan("actor_gen.device_mesh=[4,5,6,7]", "actor_gen.parallel.data_parallel_size=2",
                    "actor_gen.n_mbs=3")
    f = tmp_path / "p.json"
    plan.save(str(f))
    again = load_plan(str(f))
    assert again == plan
    assert again.to_dict() == plan.to_dict()
    assert again.placements["actor_gen"] == Placement((4, 5, 6, 7), dp=2, tp=1, pp=2, num_micro_batches=3)


@pytest.mark.parametrize("mode,expect", [("d8p1m1", (8, 1, 1)), ("m2d4p1", (4, 1, 2)), ("p2m2d2", (2, 2, 2))])
def test_symmetric_modes(mode, expect):
    assert parse_symmetric(mode) == (expect[0], expect[1], expect[2])
    plan = ppo_plan(f"allocation_mode={mode}")
    for p in plan.placements.values():
        assert (p.dp, p.pp, p.tp) == expect and p.devices == tuple(range(8))


def test_symmetric_for_gen_and_bad_strings():
    cfg = parse_experiment("gen", ["model.type._class=llama", "model.type.size=7", "allocation_mode=d2p1m1",
                                   "n_gpus_per_node=2", "cluster=cpu"])
    plan = make_plan(resolve("gen", cfg))
    assert plan.placements["gen"].dp == 2
    assert parse_symmetric("d2p1") is None and parse_symmetric("d2p1m1m1") is None and parse_symmetric("x") is None
    with pytest.raises(UserError, match="allocation_mode"):
        ppo_plan("allocation_mode=banana")
    with pytest.raises(UserError, match="16"):
        ppo_plan("allocation_mode=d4p2m2")


def test_pipe_modes_and_heuristic():
    p = ppo_plan("allocation_mode=pipe_data", "n_nodes=2")
    assert {(x.dp, x.pp, x.tp) for x in p.placements.values()} == {(8, 2, 1)}
    p = ppo_plan("allocation_mode=pipe_model", "n_nodes=2")
    assert {(x.dp, x.pp, x.tp) for x in p.placements.values()} == {(1, 2, 8)}
    h = ppo_plan("allocation_mode=heuristic")
    # ReaL's 8-GPU heuristic: training halves, generation and the reference everywhere
    assert h.placements["actor_train"].devices == (0, 1, 2, 3) and h.placements["critic_train"].devices == (4, 5, 6, 7)
    assert h.placements["actor_gen"].devices == tuple(range(8)) and h.placements["rew_inf"].devices == (0, 1, 2, 3)
    # ReaL picks dp2·tp2 for 7B with 16 bytes of train state per parameter; ours keeps fp32 gradients
    # (18 bytes), which the memory model may push to tp4: the fewest model-parallel ranks that fit.
    t = h.placements["actor_train"]
    assert (t.dp, t.tp) in {(2, 2), (1, 4)} and t.dp * t.tp * t.pp == 4
    h70 = ppo_plan("allocation_mode=heuristic", "n_nodes=16", "actor.type.size=70", "critic.type.size=70",
                   "ref.type.size=70", "rew.type.size=70")
    t = h70.placements["actor_train"]
    assert t.tp * t.pp >= 8 and len(t.devices) == 64


def test_manual_errors_name_the_call():
    with pytest.raises(PlanError) as e:
        ppo_plan("actor_gen.parallel.data_parallel_size=3")
    assert "actor_gen.parallel" in str(e.value) and "3·1·2 = 6" in str(e.value)
    with pytest.raises(PlanError, match="critic_train.*divide the 32 attention heads"):
        ppo_plan("critic_train.parallel.model_parallel_size=3", "critic_train.device_mesh=[0,1,2]")
    with pytest.raises(PlanError, match="actor_gen.*fewer than n_mbs=200"):
        ppo_plan("actor_gen.n_mbs=200")


def _edit(plan, fn):
    d = json.loads(plan.dumps())
    fn(d)
    return d


def test_load_reports_every_problem():
    plan = ppo_plan()

    def breaks(d):
        calls = {c["name"]: c for c in d["calls"]}
        calls["actor_gen"]["placement"]["dp"] = 3
        calls["ref_inf"]["placement"]["tp"] = 3
        calls["ref_inf"]["placement"]["pp"] = 1
        calls["ref_inf"]["placement"]["devices"] = [0, 1, 2]
        calls["rew_inf"]["placement"]["devices"] = [8, 9, 10, 11, 12, 13, 14, 15]
        calls["critic_inf"]["placement"]["pp"] = 64
        calls["critic_inf"]["placement"]["tp"] = 1
        calls["critic_inf"]["placement"]["devices"] = list(range(64))

    with pytest.raises(PlanError) as e:
        plan_from_dict(_edit(plan, breaks))
    msg = str(e.value)
    assert "call actor_gen" in msg and "dp*tp*pp" in msg
    assert "call ref_inf" in msg and "does not divide" in msg
    assert "call rew_inf" in msg and "[8, 9, 10, 11, 12, 13, 14, 15]" in msg
    assert "call critic_inf" in msg and "exceeds the 32 layers" in msg
    assert len(e.value.problems) >= 4


def test_kv_head_rule():
    plan = ppo_plan("actor.type.size=70", "actor.type._class=llama", "n_nodes=2", "allocation_mode=d16p1m1")  # 70B: 64 heads, 8 kv heads

    def tp16(d):
        calls = {c["name"]: c for c in d["calls"]}
        calls["actor_train"]["placement"].update(devices=list(range(16)), tp=16, dp=1, pp=1)
    plan_from_dict(_edit(plan, tp16))  # 16 % 8 == 0: kv heads replicated in pairs — valid

    spec = plan.models["actor"]
    assert spec.num_kv_heads == 8
    from reallm.plan import placement_problems
    assert placement_problems(spec, Placement(tuple(range(4)), tp=4)) == []
    assert placement_problems(spec.__class__(**{**spec.to_dict(), "num_heads": 12, "num_kv_heads": 4}),
                              Placement(tuple(range(6)), tp=6))  # 6 vs 4 kv heads: neither divides


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(version=PLAN_VERSION + 1), "newer"),
    (lambda d: d.update(format="other"), "not a reallm plan"),
    (lambda d: d.pop("calls"), "missing top-level field 'calls'"),
    (lambda d: d["calls"][0].update(kind="fly"), "kind"),
    (lambda d: d["calls"][0]["placement"].update(bogus=1), "bogus"),
])
def test_malformed_plans(mutate, needle):
    with pytest.raises(UserError, match=needle):
        plan_from_dict(_edit(ppo_plan(), mutate))
