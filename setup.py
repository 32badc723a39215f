"""Build and install reallm (packages reallm, planner, executor) and its C++ parts.

Install torch==2.13.0 first, then `pip install --no-build-isolation -e .` (the Makefile does both):
a build-isolated install would fetch another torch. Nothing here imports torch.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def ext_modules():
    """C++ extensions built with pybind11: one per folder of csrc/ that has sources."""
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # pybind11 is a build requirement; without it we still install the pure parts
        print("warning: pybind11 not found; C++ extensions are not built")
        return []
    exts = []
    # csrc/<package>/<module>/*.cpp  →  extension <package>._<module>
    for folder in sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*"))):
        sources = sorted(glob.glob(os.path.join(folder, "*.cpp")))
        if not sources:
            continue
        pkg, mod = os.path.relpath(folder, os.path.join(ROOT, "csrc")).split(os.sep)
        exts.append(Pybind11Extension(f"{pkg}._{mod}", [os.path.relpath(s, ROOT) for s in sources],
                                      cxx_std=17, extra_compile_args=["-O3"]))
    return exts


setup(
    name="reallm",
    version="0.1.0",
    description="Search-based auto-parallel planner and executor for RLHF training of LLMs",
    packages=find_packages(include=["reallm", "reallm.*", "planner", "planner.*", "executor", "executor.*"]),
    ext_modules=ext_modules(),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "transformers>=5.0",
        "networkx>=3.0",
        "numpy>=1.24",
        "hydra-core==1.3.8",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        "planner": ["ortools"],
        "dev": ["pytest", "ruff", "matplotlib", "tensorboard", "ortools", "pybind11"],
    },
    entry_points={
        "console_scripts": [
            "planner=planner.cli:main",
            "executor=executor.cli:main",
            "reallm-assets=reallm.assets.__main__:main",
        ]
    },
)
