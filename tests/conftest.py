import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


def run_cli(args, cwd=None, timeout=120):
    """Run a console entry point as a subprocess; returns CompletedProcess (text)."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny tokenizer, checkpoints and addition datasets, built once per test session."""
    from reallm.assets import make_tiny_assets

    return make_tiny_assets(str(tmp_path_factory.mktemp("assets") / "tiny"))


@pytest.fixture(scope="session")
def sft_addition_checkpoint(tmp_path_factory, tiny_assets):
    """The tiny llama after ~600 SFT steps on the addition task (about half its greedy answers exact):
    the starting point of the PPO learning test. Built once per session (~40 s)."""
    from reallm.apps.quickstart import run

    out = tmp_path_factory.mktemp("sft_addition")
    rc = run("sft", [f"model.path={tiny_assets['llama']}", f"dataset.train_path={tiny_assets['sft_train']}",
                     "allocation_mode=d2p1m1", "n_gpus_per_node=2", "cluster=cpu", "dataset.max_seqlen=32",
                     "dataset.train_bs_n_seqs=64", "total_train_epochs=4", "model.gradient_checkpointing=False",
                     "model.optimizer.lr=3e-3", "model.optimizer.weight_decay=0.0",
                     "model.optimizer.lr_scheduler_type=constant", "eval_freq_epochs=null",
                     f"output_dir={out}", "experiment_name=sft", "trial_name=addition"], quiet=True)
    assert rc == 0
    from reallm.algorithms.recovery import latest_checkpoint

    return latest_checkpoint(str(out / "sft" / "addition" / "checkpoints" / "default"))
