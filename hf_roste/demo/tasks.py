"""The demo's data, generated in code: a character tokenizer, the pretraining mix and the held-out task.

Pretraining mix (one example per line, each ending with `<eos>`), exact answers only:

- ``add``:  ``23+45=68``             (operands 0..99)
- ``sub``:  ``45-23=22``             (non-negative results)
- ``mul``:  ``37*8=296``             (two-digit times one-digit)
- ``rev``:  ``rev(abcd)=dcba``       (1..10 lowercase letters)
- ``up``:   ``up(abcd)=ABCD``
- ``sort``: ``sort(dcab)=abcd``
- ``len``:  ``len(abcd)=4``
- ``max``:  ``max(3,9,4)=9``         (2..5 numbers 0..99)

Held-out fine-tuning task: ``count(abcd)=4``, a held-out *format* (the prompt word ``count`` never
appears in the mix) of a skill the small base did learn (``len``). A first choice, ``ru(abcd)=DCBA``
(reverse and uppercase in one step), was not learnable in the demo's budget: the shipped base never
got good at ``rev``/``up`` (see ``pretrain_log.json``).
"""

from __future__ import annotations

import random
import string

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)]
VOCAB_SIZE = 128  # 99 used; a multiple of 64 keeps the embedding Hadamard-friendly
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_CHAR_ID = {ch: i + len(SPECIALS) for i, ch in enumerate(CHARS)}

PRETRAIN_TASKS = ("add", "sub", "mul", "rev", "up", "sort", "len", "max")
HELD_OUT_TASK = "count"


def char_tokenizer():
    """Character-level `PreTrainedTokenizerFast` (99 tokens: 4 specials + printable ASCII)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.padding_side = "left"  # for batched greedy generation; training collators pad themselves
    return fast


def encode(text: str) -> list[int]:
    return [_CHAR_ID.get(ch, UNK_ID) for ch in text]


def decode(ids) -> str:
    """Inverse of `encode`; special tokens are shown as `<eos>`, `<pad>`, ..."""
    table = SPECIALS + CHARS
    return "".join(table[i] if 0 <= i < len(table) else "<unk>" for i in ids)


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def pretrain_example(rng: random.Random, task: str | None = None) -> tuple[str, str]:
    """One (prompt, answer) pair of the pretraining mix; `task` None draws a task uniformly."""
    task = task or rng.choice(PRETRAIN_TASKS)
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}=", str(a + b)
    if task == "sub":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}=", str(a - b)
    if task == "mul":
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        return f"{a}*{b}=", str(a * b)
    if task == "max":
        xs = [rng.randint(0, 99) for _ in range(rng.randint(2, 5))]
        return f"max({','.join(map(str, xs))})=", str(max(xs))
    w = _word(rng, 1, 10)
    if task == "rev":
        return f"rev({w})=", w[::-1]
    if task == "up":
        return f"up({w})=", w.upper()
    if task == "sort":
        return f"sort({w})=", "".join(sorted(w))
    if task == "len":
        return f"len({w})=", str(len(w))
    raise ValueError(f"unknown pretraining task {task!r}; expected one of {PRETRAIN_TASKS}")


def pretrain_sequence(rng: random.Random, seq_len: int) -> list[int]:
    """Whole examples (`prompt answer <eos>`) packed into one sequence of exactly `seq_len` ids (pad-filled)."""
    ids: list[int] = []
    while True:
        p, a = pretrain_example(rng)
        ex = encode(p + a) + [EOS_ID]
        if len(ids) + len(ex) > seq_len:
            break
        ids += ex
    return ids + [PAD_ID] * (seq_len - len(ids))


def held_out_example(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 1, 10)
    return f"count({w})=", str(len(w))


def held_out_split(n: int, seed: int, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """`n` distinct held-out pairs (prompts not in `exclude`), deterministic in `seed`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        p, c = held_out_example(rng)
        if p in seen:
            continue
        seen.add(p)
        out.append((p, c))
    return out
