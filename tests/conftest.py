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

