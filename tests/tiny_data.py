"""An in-memory character tokenizer and small synthetic SFT datasets (no download)."""

from __future__ import annotations

import random

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}A:{% generation %}{{ message['content'] }}<eos>{% endgeneration %}"
    "{% else %}U:{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with 99 tokens (fits the tiny models' vocab of 128)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        out.append((f"{a}+{b}=", f"{a + b}"))
    return out


def prompt_completion_dataset(n: int = 64, seed: int = 0) -> Dataset:
    p, c = zip(*_pairs(n, seed), strict=True)
    return Dataset.from_dict({"prompt": list(p), "completion": list(c)})


def messages_dataset(n: int = 64, seed: int = 0) -> Dataset:
    rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in _pairs(n, seed)]
    return Dataset.from_dict({"messages": rows})


def text_dataset(n: int = 64, seed: int = 0) -> Dataset:
    return Dataset.from_dict({"text": [p + c for p, c in _pairs(n, seed)]})


def save_tiny_with_tokenizer(kind: str, directory) -> str:
    """A saved tiny model of `kind` with the char tokenizer next to it (a folder the CLI can load)."""
    from tiny_models import save_tiny

    path = save_tiny(kind, directory)
    char_tokenizer().save_pretrained(path)
    return str(path)


def write_jsonl(path, rows) -> str:
    """Write `rows` (dicts) as JSON lines to `path`; returns the path as a string."""
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)
