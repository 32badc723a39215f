"""Acceptance check of the seed's SFT command, judged by ``transformers`` alone.

    python examples/check_seed_sft.py SFT_OUTPUT_DIR START_CHECKPOINT [--valid FILE] [--tokenizer DIR]

SFT_OUTPUT_DIR is the trial folder the quickstart wrote (``outputs/quickstart-sft/my-trial``: its last
``checkpoints/default/step*`` is judged) or a checkpoint folder itself. Both checkpoints are loaded with
``AutoModelForCausalLM`` and the tiny tokenizer (``reallm.assets``' ``assets/tokenizer``); the answer loss
is the mean NLL per answer token (the answer and its EOS; prompt tokens masked) over the held-out SFT
data, tokenised as the training code does: ``tokenizer(prompt)`` then ``tokenizer(answer,
add_special_tokens=False)`` + EOS. Exits non-zero unless the SFT checkpoint's loss is below
``--max-ratio`` (default 0.5) times the starting checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

#: Sequences per forward pass (right-padded; the padding is masked out of the loss).
BATCH_SIZE = 64


def last_checkpoint(path: str) -> str:
    """``path`` itself when it holds a checkpoint, else its last ``checkpoints/default/step{N}``."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    root = os.path.join(path, "checkpoints", "default")
    steps = sorted((int(m.group(1)), d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if (m := re.fullmatch(r"step(\d+)", d)))
    if not steps:
        raise SystemExit(f"error: no checkpoint under {root}; run examples/seed_commands.sh first")
    return os.path.join(root, steps[-1][1])


def answer_examples(valid_path: str, tok) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) per held-out record."""
    out = []
    with open(valid_path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                p = tok(r["prompt"])["input_ids"]
                a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                out.append((p + a, len(p)))
    return out


@torch.no_grad()
def answer_loss(ckpt: str, examples: list[tuple[list[int], int]], pad_id: int) -> float:
    """Mean NLL per answer token of ``ckpt`` on ``examples``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    total_nll, num_tokens = 0.0, 0
    for i in range(0, len(examples), BATCH_SIZE):
        part = examples[i:i + BATCH_SIZE]
        seq_len = max(len(t) for t, _ in part)
        ids_BT = torch.full((len(part), seq_len), pad_id, dtype=torch.long)
        attn_BT = torch.zeros((len(part), seq_len), dtype=torch.long)
        answer_BT = torch.zeros((len(part), seq_len), dtype=torch.bool)  # positions whose token is scored
        for b, (tokens, prompt_len) in enumerate(part):
            ids_BT[b, :len(tokens)] = torch.tensor(tokens)
            attn_BT[b, :len(tokens)] = 1
            answer_BT[b, prompt_len:len(tokens)] = True
        logp_BTV = model(input_ids=ids_BT, attention_mask=attn_BT).logits.float().log_softmax(-1)
        # position t predicts token t + 1
        nll_BT = -logp_BTV[:, :-1].gather(-1, ids_BT[:, 1:, None])[..., 0]
        mask_BT = answer_BT[:, 1:]
        total_nll += float(nll_BT[mask_BT].double().sum())
        num_tokens += int(mask_BT.sum())
    return total_nll / max(num_tokens, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sft", help="the SFT trial folder (or a checkpoint folder)")
    ap.add_argument("start", help="the starting checkpoint of the SFT run")
    ap.add_argument("--valid", default="assets/data/sft_valid.jsonl", help="held-out prompt/answer JSONL")
    ap.add_argument("--tokenizer", default="assets/tokenizer", help="the tiny tokenizer (reallm.assets)")
    ap.add_argument("--max-ratio", type=float, default=0.5, help="pass when sft loss < ratio × start loss")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the seed script's log to its own lines
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    examples = answer_examples(args.valid, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sft_ckpt = last_checkpoint(args.sft)
    t0 = time.time()
    start_loss = answer_loss(args.start, examples, pad_id)
    sft_loss = answer_loss(sft_ckpt, examples, pad_id)
    n_answer = sum(len(t) - p for t, p in examples)
    print(f"answer loss on {args.valid} ({len(examples)} prompts, {n_answer} answer tokens, transformers alone):")
    print(f"  start {args.start}: {start_loss:.4f} nats/token")
    print(f"  sft   {sft_ckpt}: {sft_loss:.4f} nats/token ({sft_loss / start_loss:.1%} of start; {time.time() - t0:.0f}s)")
    if not sft_loss < args.max_ratio * start_loss:
        print(f"FAIL: the SFT answer loss is not below {args.max_ratio} × the starting one", file=sys.stderr)
        return 1
    print("PASS: the SFT checkpoint has clearly lower answer loss than the starting model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
