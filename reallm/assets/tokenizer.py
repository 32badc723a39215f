"""A tiny byte-level BPE tokenizer, trained offline with ``tokenizers`` on a corpus this module writes.

Conventions (LLaMA-like, so code written against the tiny assets works on real LLaMA checkpoints):

* special tokens ``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS), ``<pad>``=3;
* ``tokenizer(text)`` **prepends BOS and appends nothing** (like LLaMA); ``add_special_tokens=False`` gives
  the bare pieces. Training code tokenises a prompt with ``tokenizer(prompt)`` and the answer with
  ``tokenizer(answer, add_special_tokens=False)`` plus ``eos_token_id``. The BOS lives in the post-processor
  of ``tokenizer.json``; transformers 5 reports ``tokenizer.add_bos_token == False`` after loading any
  tokenizer.json-backed tokenizer, so test ``tokenizer("x").input_ids[0] == bos_token_id`` instead;
* every digit is its own token (like LLaMA's SentencePiece), so ``"17+25=" + "42"`` tokenises as the
  concatenation of the two halves and a model can learn addition digit by digit;
* byte-level: any UTF-8 text encodes (``<unk>`` is never produced) and decodes back exactly;
* ``VOCAB_SIZE`` = 384 = 4 special + 256 bytes + 124 merges learnt from a little English, so merges exist
  (not a degenerate byte tokenizer); 384 = 3 * 128 divides evenly for tensor parallelism 1, 2, 3, 4, 6, 8.

The corpus is fixed (it does not depend on the asset seed): every seed's checkpoints share one vocabulary.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from typing import Any

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
#: In id order: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
SPECIAL_TOKEN_IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 384
#: Same as the checkpoints' ``max_position_embeddings``.
MODEL_MAX_LENGTH = 1024

# A little English so BPE has words to merge; the arithmetic vocabulary keeps it on topic.
_ENGLISH = """\
Addition is the first operation most children learn. To add two numbers, write one above the other,
line up the units, and add each column from right to left. When a column adds up to ten or more, write
down the last digit and carry one to the next column. The sum of two numbers does not depend on their
order: seven plus five is the same as five plus seven. Adding zero changes nothing. A small model can
learn this rule from examples if it sees enough of them, but it often makes near misses: it forgets a
carry, or it carries when it should not. A reward that checks the answer tells the model which of its
guesses were right, and the model slowly improves. Practice with many different problems, check every
answer, and keep the digits in their columns. Numbers are written with the digits zero, one, two,
three, four, five, six, seven, eight and nine. The question asks for the total, and the answer is a
single number. Please answer the following questions. Think step by step, then write the result.
"""
_WORDS = ("plus", "and", "add", "sum", "total", "equals", "is", "makes", "gives")
_TEMPLATES = (
    "What is {a} {w} {b}? The answer is {s}.",
    "{a} {w} {b} is {s}.",
    "The sum of {a} and {b} is {s}.",
    "If you add {a} and {b}, you get {s}.",
    "{a}+{b}={s}",
)


def tokenizer_corpus(num_lines: int = 2000) -> Iterator[str]:
    """The training corpus: the English text, templated sentences and bare problems (fixed seed)."""
    rng = random.Random("tokenizer-corpus")
    yield from _ENGLISH.splitlines()
    for _ in range(num_lines):
        a, b = rng.randrange(100), rng.randrange(100)
        yield rng.choice(_TEMPLATES).format(a=a, b=b, s=a + b, w=rng.choice(_WORDS))


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """Train the BPE and wrap it as a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Digits first, so no merge ever spans two digits; then GPT-2's byte-level split (no prefix space, so
    # "17+25=" starts with "1", not "Ġ1").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        # All 256 bytes, seen in the corpus or not: that is what makes <unk> unreachable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        # Fewer merges than asked for means the corpus ran out of pairs; the checkpoints' vocab_size and
        # the tensor-parallel divisibility promised above would silently change.
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, wanted {vocab_size}: enlarge the corpus")
    got = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if got != SPECIAL_TOKEN_IDS:
        raise RuntimeError(f"special token ids {got} != {SPECIAL_TOKEN_IDS}")
    # LLaMA's convention: BOS before each sequence, no EOS (the trainer appends EOS after the answer).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, SPECIAL_TOKEN_IDS[BOS])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=MODEL_MAX_LENGTH)


def save_tokenizer(tokenizer: Any, out_dir: str) -> list[str]:
    """``save_pretrained`` plus a portable ``tokenizer_config.json``; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.abspath(f) for f in tokenizer.save_pretrained(out_dir)]
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    # transformers 5 writes "TokenizersBackend", which transformers 4 (and tools pinned to it) cannot load;
    # "PreTrainedTokenizerFast" loads in both. The add_*_token keys only document the post-processor:
    # transformers 5 ignores them when tokenizer.json is present.
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    with open(cfg_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return sorted(set(files) | {os.path.abspath(cfg_path)})
