"""Checkpoints and exact recovery (issue 9): a 2-process SFT job killed (SIGKILL, the whole process group)
after its first recovery state, then resumed, ends with the final HF checkpoint of an uninterrupted run;
incomplete states and temporary names are ignored; resuming with nothing (or another configuration) is a
one-paragraph error with exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reallm.algorithms import recovery
from reallm.apps.quickstart import main, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_STEPS = 8  # 64 rows, 8 per step, one epoch
SAVE_EVERY = 3  # checkpoints and recovery states after steps 3, 6 and 8
HOLD_AT = 4  # 0-based step at which the job to be killed stops (after writing step 4's metrics)

# The job to kill: quickstart itself, except that its workers (forked, so they inherit the patch) wait at
# step HOLD_AT, so the kill lands at a known point whatever the machine's load.
HOLD = f"""
import sys, time
from reallm.algorithms import sft
_run_call = sft.SFTRuntime.run_call
def run_call(self, ctx, batch):
    if ctx.step == {HOLD_AT}:
        time.sleep(600)
    return _run_call(self, ctx, batch)
sft.SFTRuntime.run_call = run_call
from reallm.apps.quickstart import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def sft_data(tiny_assets, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("recovery_data") / "train64.jsonl")
    with open(tiny_assets["sft_train"]) as f, open(path, "w") as g:
        g.writelines(f.readlines()[:64])
    return path


def overrides(assets, data, out, trial, layout, *extra):
    return [f"model.path={assets['llama']}", f"dataset.train_path={data}", f"allocation_mode={layout}",
            "n_gpus_per_node=2", "cluster=cpu", "dataset.max_seqlen=32", "model.gradient_checkpointing=False",
            "dataset.train_bs_n_seqs=8", "model.optimizer.lr=3e-3", f"save_freq_steps={SAVE_EVERY}",
            "eval_freq_epochs=null", f"output_dir={out}", "experiment_name=sft", f"trial_name={trial}", *extra]


def load_ckpt(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def metrics(trial_dir):
    with open(os.path.join(trial_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def steps_written(trial_dir):
    """Steps of the whole lines of metrics.jsonl so far (rank 0 may be writing the next one)."""
    try:
        with open(os.path.join(trial_dir, "metrics.jsonl")) as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [json.loads(x)["step"] for x in lines]


def run_and_kill(args, trial_dir, timeout_s=90.0):
    """Start the job in its own process group; SIGKILL the group once step SAVE_EVERY's recovery state is
    complete and step HOLD_AT's metrics are written."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, "sft", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = os.path.join(recovery.state_dir(trial_dir, SAVE_EVERY), recovery.MARKER)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the job ended (rc {proc.returncode}) before it was killed:\n{proc.stdout.read()}")
            if os.path.exists(marker) and HOLD_AT in steps_written(trial_dir):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no recovery state of step {SAVE_EVERY} within {timeout_s} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("layout,extra", [("d2p1m1", ("model.optimizer.zero_stage=1",)), ("d1p2m1", ())],
                         ids=["dp2-zero1", "pp2"])
def test_killed_then_resumed_equals_uninterrupted(tmp_path, tiny_assets, sft_data, layout, extra, capsys):
    out = str(tmp_path)
    ref_mode = "disabled" if layout == "d2p1m1" else "auto"  # auto with nothing to resume starts fresh
    assert run("sft", overrides(tiny_assets, sft_data, out, "ref", layout, f"recover_mode={ref_mode}", *extra),
               quiet=True) == 0
    ref_dir = os.path.join(out, "sft", "ref")

    trial = os.path.join(out, "sft", "crash")
    args = overrides(tiny_assets, sft_data, out, "crash", layout, *extra)
    run_and_kill([*args, "recover_mode=save"], trial)
    assert [n for n, _ in recovery.complete_states(trial)] == [SAVE_EVERY]
    assert [n for n, _ in recovery.list_checkpoints(os.path.join(trial, "checkpoints", "default"))] == [SAVE_EVERY]
    assert [r["step"] for r in metrics(trial)] == list(range(1, HOLD_AT + 1))
    # What a crash in the middle of a later save leaves: a state without its marker, a half HF export.
    junk = recovery.state_dir(trial, 6)
    os.makedirs(junk)
    with open(os.path.join(junk, "rank0.pt"), "wb") as f:
        f.write(b"half a file")
    half = recovery.temp_path(recovery.checkpoint_path(trial, "default", 6))
    os.makedirs(half)
    open(os.path.join(half, "config.json"), "w").close()

    resume_mode = "resume" if layout == "d2p1m1" else "auto"  # auto resumes when there is a state
    assert run("sft", [*args, f"recover_mode={resume_mode}"], quiet=True) == 0

    final = f"checkpoints/default/step{NUM_STEPS}"
    a, b = load_ckpt(os.path.join(ref_dir, final)), load_ckpt(os.path.join(trial, final))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)  # bitwise equal on CPU
    assert sorted(os.listdir(os.path.join(trial, "checkpoints", "default"))) == ["step3", "step6", "step8"]
    assert os.listdir(recovery.recover_root(trial)) == [f"step{NUM_STEPS}"]  # older and incomplete ones gone
    assert recovery.read_marker(recovery.state_dir(trial, NUM_STEPS))["next_step"] == NUM_STEPS
    rows, ref_rows = metrics(trial), metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
    for r, q in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(q["loss"], abs=1e-6) and r["lr"] == pytest.approx(q["lr"], rel=1e-9)

    if layout == "d2p1m1":  # a resume under another configuration is refused before any process starts
        with pytest.raises(SystemExit) as e:
            main(["sft", *args, "recover_mode=resume", "dataset.train_bs_n_seqs=16"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "dataset.train_bs_n_seqs: 8 then, 16 now" in err and "Traceback" not in err


def test_resume_with_nothing_errors_clearly(tmp_path, tiny_assets, sft_data, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", *overrides(tiny_assets, sft_data, str(tmp_path), "none", "d2p1m1", "recover_mode=resume")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no complete recovery state" in err and "Traceback" not in err
    # an incomplete state (no marker) does not count
    os.makedirs(recovery.state_dir(os.path.join(str(tmp_path), "sft", "none"), 3))
    with pytest.raises(SystemExit) as e:
        main(["sft", *overrides(tiny_assets, sft_data, str(tmp_path), "none", "d2p1m1", "recover_mode=resume")])
    assert e.value.code == 2


# -- pure logic --------------------------------------------------------------------------------------------------


def test_publish_dir_and_readers_ignore_temp_names(tmp_path):
    role = tmp_path / "checkpoints" / "default"
    for name in ("step2", "step10", ".step12.tmp", ".step2.old", "notes"):
        os.makedirs(role / name)
    assert [n for n, _ in recovery.list_checkpoints(str(role))] == [2, 10]
    assert recovery.latest_checkpoint(str(role)) == str(role / "step10")
    final = str(role / "step2")
    for version in ("a", "b"):  # publish, then replace a published directory
        tmp = recovery.temp_path(final)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "v"), "w") as f:
            f.write(version)
        recovery.publish_dir(tmp, final)
        assert open(os.path.join(final, "v")).read() == version and not os.path.exists(tmp)
    assert sorted(os.listdir(role)) == [".step12.tmp", "notes", "step10", "step2"]  # the old copy is gone


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    recovery.truncate_metrics(path, 3)
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 3]


def test_fingerprint_differences_name_the_keys():
    a = {"config": {"seed": 1, "dataset": {"train_bs_n_seqs": 8}}, "world_size": 2}
    b = {"config": {"seed": 1, "dataset": {"train_bs_n_seqs": 16}}, "world_size": 2}
    assert recovery.fingerprint_differences(a, a) == []
    (d,) = recovery.fingerprint_differences(a, b)
    assert d.startswith("config.dataset.train_bs_n_seqs: 8")
