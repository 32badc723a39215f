"""The command lines: seed commands plan as written; every bad input is a short error, exit code 2."""

import json

import pytest

from executor.cli import main as executor_main
from planner.cli import main as planner_main
from reallm.apps.quickstart import main as quickstart_main
from tests.conftest import run_cli
from tests.test_config import seed_commands
from tests.test_plan import SEED_PPO


def fails(capsys, fn, argv, *needles):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_planner_search_seed_ppo_layouts(tmp_path, capsys):
    keys = [k for k in seed_commands()["ppo"] if ".parallel." in k]
    out = tmp_path / "p.json"
    assert planner_main(["search", "configs/ppo.yaml", "allocation_mode=manual", *keys, "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    got = {c["name"]: (c["placement"]["tp"], c["placement"]["pp"], c["placement"]["dp"]) for c in plan["calls"]}
    assert got == SEED_PPO
    assert all(c["placement"]["devices"] == list(range(8)) for c in plan["calls"])
    printed = capsys.readouterr().out
    assert "actor_gen" in printed and "wrote" in printed
    assert planner_main(["show", str(out)]) == 0
    assert "critic_inf" in capsys.readouterr().out


def test_console_scripts_run_as_processes(tmp_path):
    out = tmp_path / "p.json"
    r = run_cli(["-m", "planner.cli", "search", "configs/sft.yaml", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    r = run_cli(["-m", "executor.cli", "run", str(out)])
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = run_cli(["-m", "planner.cli", "search", "configs/sft.yaml", "+x=1"])
    assert r.returncode == 2 and "not allowed" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needles", [
    (["nonsense=1"], ["unknown key 'nonsense'"]),
    (["dataset.max_seqlen=long"], ["dataset.max_seqlen"]),
    (["+key=1"], ["not allowed"]),
    (["allocation.parallel.data_parallel_size=3"], ["3·2·1 = 6", "8 devices"]),
    (["allocation.parallel.model_parallel_size=3", "allocation.parallel.data_parallel_size=1",
      "allocation.device_mesh=[0,1,2]"], ["divide the 32 attention heads"]),
    (["allocation.device_mesh=NODE01:0,1"], ["device_mesh"]),
])
def test_planner_bad_overrides(capsys, args, needles):
    fails(capsys, planner_main, ["search", "configs/sft.yaml", *args, "--out", "/dev/null"], *needles)


def test_quickstart_seed_keys_accepted(tmp_path, capsys):
    """Every seed command parses and plans (7B presets, no checkpoints); datasets are checked first."""
    for exp, keys in seed_commands().items():
        keys = [k for k in keys if not k.startswith(("model.path", "actor.path", "critic.path", "ref.path",
                                                     "rew.path", "dataset."))]
        data = tmp_path / f"{exp}.jsonl"
        rec = {"prompt": "1+1=", "answer": "2", "pos_answers": ["2"], "neg_answers": ["3"]}
        data.write_text(json.dumps(rec) + "\n")
        ds = [f"dataset.path={data}"] if exp == "ppo" else [f"dataset.train_path={data}"]
        assert quickstart_main([exp, "--plan-only", f"output_dir={tmp_path}", *keys, *ds]) == 0, exp
        assert (tmp_path / f"{[k for k in keys if k.startswith('experiment_name=')][0].split('=')[1]}").exists()


def test_quickstart_dataset_errors(tmp_path, capsys):
    base = ["sft", "--plan-only", f"output_dir={tmp_path}", "allocation_mode=d8p1m1",
            "model.type._class=llama", "model.type.size=7"]
    fails(capsys, quickstart_main, base + [f"dataset.train_path={tmp_path}/nope.jsonl"], "nope.jsonl", "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a" "answer": "b"}\n')
    fails(capsys, quickstart_main, base + [f"dataset.train_path={bad}"], "bad.jsonl: line 2", "malformed JSON")
    bad.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n')
    fails(capsys, quickstart_main, base + [f"dataset.train_path={bad}"], "line 3", "'answer'")
    arr = tmp_path / "bad.json"
    arr.write_text('[\n {"prompt": "a", "answer": "b"},\n {"prompt": "a",\n  "answr": "b"}\n]\n')
    fails(capsys, quickstart_main, base + [f"dataset.train_path={arr}"], "bad.json: line 3", "'answer'")
    fails(capsys, quickstart_main, ["ppo", "--plan-only", "dataset.path="], "dataset.path is not set")


def test_show_and_run_reject_bad_plans(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text('{"format": "reallm.plan", "version": 1,\n "calls": [}\n')
    for fn, cmd in ((planner_main, "show"), (executor_main, "run")):
        fails(capsys, fn, [cmd, str(f)], "p.json: line 2", "malformed JSON")
    assert planner_main(["search", "configs/ppo.yaml", "--out", str(f)]) == 0
    d = json.loads(f.read_text())
    d["version"] = 99
    f.write_text(json.dumps(d))
    for fn, cmd in ((planner_main, "show"), (executor_main, "run")):
        fails(capsys, fn, [cmd, str(f)], "version 99 is newer")
    fails(capsys, planner_main, ["show", str(tmp_path / "missing.json")], "cannot read plan")


def test_planner_does_not_import_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import reallm.config.parse, reallm.config.resolve, reallm.dataflow, reallm.plan, reallm.placement\n"
            "import reallm.spec, reallm.cluster, reallm.datasets, planner, planner.allocation, planner.cli\n"
            "from reallm.config.parse import parse_experiment\n"
            "from reallm.config.resolve import resolve\n"
            "from planner.allocation import make_plan\n"
            "make_plan(resolve('ppo', parse_experiment('ppo', [], yaml_path='configs/ppo.yaml')))\n"
            "import importlib, pkgutil\n"
            "for m in ['reallm.layout', 'planner.cost_model', 'planner.search', 'planner.simulate']:\n"
            "    try: importlib.import_module(m)\n"
            "    except ModuleNotFoundError as e:\n"
            "        if e.name != m: raise\n"
            "print('ok')\n")
    r = run_cli(["-c", code])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
