"""Tiny assets made offline for tests and smoke runs: a BPE tokenizer, random HF checkpoints per family,
and two-number addition datasets with a rule-based reward.

``make_tiny_assets(out_dir, seed=1)`` writes everything (see ``reallm.assets.build`` for the layout);
``python -m reallm.assets OUT_DIR`` does the same from the shell. ``addition_reward(prompt, completion)``
(also importable as ``reallm.assets.addition:reward``) scores completions.

Importing this package does not import torch, transformers or tokenizers: the dataset generator and the
reward are stdlib-only; the builders import the heavy libraries only when called.
"""

from reallm.assets.addition import addition_datasets, addition_reward, answer_for, parse_prompt, write_datasets
from reallm.assets.build import ASSETS_VERSION, asset_paths, is_complete, make_tiny_assets

__all__ = ["ASSETS_VERSION", "addition_datasets", "addition_reward", "answer_for", "asset_paths", "is_complete",
           "make_tiny_assets", "parse_prompt", "write_datasets"]
