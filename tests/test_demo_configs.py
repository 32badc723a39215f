"""``configs/tiny/*.yaml`` (``make demo``'s stages and their siblings) parse, resolve and plan on 8 CPU processes
from the repository root, as the demo runs them; PPO is rewarded by the addition rule, with no reward model."""

import glob
import json
import os

import pytest

from reallm.apps.quickstart import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("exp", ["sft", "rw", "dpo", "ppo", "gen"])
def test_tiny_configs_plan(exp, tiny_assets, tmp_path, monkeypatch):
    os.symlink(tiny_assets["root"], tmp_path / "assets")  # the configs name assets/… from the repository root
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run(exp, [f"output_dir={out}"], config=os.path.join(REPO, "configs", "tiny", f"{exp}.yaml"),
               plan_only=True, quiet=True) == 0
    (plan_path,) = glob.glob(str(out / "*" / "*" / "plan.json"))
    with open(plan_path) as f:
        plan = json.load(f)
    calls = [c["name"] for c in plan["calls"]]
    assert calls and all(c["placement"] for c in plan["calls"])
    if exp == "ppo":
        assert sorted(calls) == ["actor_gen", "actor_train", "critic_inf", "critic_train", "ref_inf"]
        assert plan["config"]["ppo"]["reward_fn"] == "reallm.assets.addition:reward"
