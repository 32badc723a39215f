"""``make_tiny_assets``: write the tokenizer, the tiny checkpoints and the addition datasets in one go.

Layout under ``out_dir``::

    assets.json                      version stamp: version, seed, every file with size and sha256
    tokenizer/                       tokenizer.json, tokenizer_config.json
    checkpoints/<name>/              config.json, generation_config.json, model.safetensors, tokenizer files
                                     (<name> in llama, qwen2, mistral, llama_tied, llama_9h)
    data/{sft,rw,ppo}_{train,valid}.jsonl, data/rw_full_train.jsonl, data/sft_train.json

Idempotent: an ``out_dir`` whose stamp has this ``ASSETS_VERSION`` and seed and whose files are all present
at their recorded sizes is returned untouched. Otherwise everything is built in a sibling temporary
directory and renamed into place, so a crash never leaves a half-written ``out_dir``, and two processes
building the same ``out_dir`` at once both end up with one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Optional

from reallm.assets.addition import write_datasets
from reallm.errors import UserError

#: Bump whenever anything written here changes (shapes, data, tokenizer), so stale asset dirs get rebuilt.
ASSETS_VERSION = 2
STAMP = "assets.json"


def asset_paths(out_dir: str) -> dict[str, str]:
    """Name → absolute path of everything ``make_tiny_assets`` writes (whether or not it exists yet)."""
    from reallm.assets.addition import DATASET_FILES
    from reallm.assets.checkpoints import TINY_MODELS

    root = os.path.abspath(out_dir)
    paths = {"root": root, "stamp": os.path.join(root, STAMP), "tokenizer": os.path.join(root, "tokenizer"),
             "checkpoints": os.path.join(root, "checkpoints"), "data": os.path.join(root, "data")}
    for m in TINY_MODELS:
        paths[m.name] = os.path.join(root, "checkpoints", m.name)
    for name in DATASET_FILES:
        paths[name] = os.path.join(root, "data", f"{name}.jsonl")
    paths["sft_train_json"] = os.path.join(root, "data", "sft_train.json")
    return paths


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_stamp(out_dir: str) -> Optional[dict]:
    """The parsed stamp of ``out_dir``, or None when missing or unreadable."""
    try:
        with open(os.path.join(out_dir, STAMP), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(out_dir: str, seed: int) -> bool:
    """True when ``out_dir`` holds a full build of this version with this seed (sizes checked, not hashes)."""
    stamp = read_stamp(out_dir)
    if not stamp or stamp.get("version") != ASSETS_VERSION or stamp.get("seed") != seed:
        return False
    try:
        return all(os.path.getsize(os.path.join(out_dir, rel)) == info["size"]
                   for rel, info in stamp["files"].items())
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def _build(root: str, seed: int) -> None:
    """Write every asset under ``root`` (an empty directory), stamp last."""
    import tokenizers
    import torch
    import transformers

    from reallm.assets.checkpoints import TINY_MODELS, write_checkpoint
    from reallm.assets.tokenizer import MODEL_MAX_LENGTH, save_tokenizer, train_tokenizer

    p = asset_paths(root)
    tok = train_tokenizer()
    save_tokenizer(tok, p["tokenizer"])
    ids = dict(vocab_size=len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for m in TINY_MODELS:
        write_checkpoint(m, p[m.name], seed=seed, max_position_embeddings=MODEL_MAX_LENGTH,
                         tokenizer_dir=p["tokenizer"], **ids)
    write_datasets(os.path.join(root, "data"), seed)

    # mkdtemp makes the root 0700 and safetensors files come out 0600; asset dirs are often shared, so give
    # everything the permissions a plain mkdir/open would have had.
    umask = os.umask(0)
    os.umask(umask)
    files = {}
    for dirpath, _, names in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for n in names:
            full = os.path.join(dirpath, n)
            os.chmod(full, 0o666 & ~umask)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    stamp = {
        "version": ASSETS_VERSION, "seed": seed,
        "special_token_ids": {"bos": ids["bos_id"], "eos": ids["eos_id"], "pad": ids["pad_id"],
                              "unk": tok.unk_token_id},
        "vocab_size": ids["vocab_size"], "adds_bos": True,
        # Informational only (not part of the completeness key): which libraries wrote the files.
        "written_by": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "tokenizers": tokenizers.__version__},
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(root, STAMP), "w", encoding="utf-8", newline="\n") as f:
        json.dump(stamp, f, indent=2)
        f.write("\n")


def make_tiny_assets(out_dir: str, seed: int = 1, *, force: bool = False) -> dict[str, str]:
    """Write (or reuse) every tiny asset under ``out_dir``; returns name → absolute path.

    Names: ``root``, ``stamp``, ``tokenizer``, ``checkpoints``, ``data`` (directories), one per checkpoint
    (``llama``, ``qwen2``, ``mistral``, ``llama_tied``, ``llama_9h``), one per dataset (``sft_train`` …
    ``ppo_valid``) and ``sft_train_json``.
    ``force`` rebuilds even a complete ``out_dir``. Refuses (``UserError``) to replace a non-empty
    ``out_dir`` that is not an asset directory, so a typo cannot wipe an unrelated folder.
    """
    # realpath: with a symlinked out_dir, swap the directory it points to, not the link.
    root = os.path.realpath(out_dir)
    paths = asset_paths(root)
    if not force and is_complete(root, seed):
        return paths
    if os.path.isdir(root) and os.listdir(root) and read_stamp(root) is None:
        raise UserError(f"{root}: exists, is not empty and has no {STAMP}; not overwriting it. "
                        f"Pass an empty or new directory for the tiny assets.")
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"{root}: exists and is not a directory")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem (atomic).
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    aside: Optional[str] = None
    try:
        _build(tmp, seed)
        if not force and is_complete(root, seed):
            # Another process finished the same build meanwhile and may already be reading it: keep its copy.
            return paths
        if os.path.isdir(root):
            # Stale, incomplete, other seed or forced: move the old copy aside before swapping the new one in.
            aside = os.path.join(parent, f".{os.path.basename(root)}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(root, aside)
            except FileNotFoundError:  # another process moved it first
                aside = None
        try:
            os.rename(tmp, root)
        except OSError:
            # Lost a race: another process installed its build between our check and our rename.
            if not is_complete(root, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return paths
