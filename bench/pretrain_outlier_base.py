"""Pre-train a deeper, demo-compatible base on language-like text or code plus the demo's task mix.

Why: the demo base (4 layers, task mix only) shows outliers only at the `down_proj` inputs; its
residual stream (q_proj / gate_proj inputs) stays flat, so W4A4KV4 round-to-nearest barely hurts it.
This script trains a Llama-shaped model from scratch in a regime where the literature reports
residual outliers / massive activations emerging by themselves: a deeper stack (12 layers,
hidden 128, 2 heads of 64, 1 KV head, intermediate 512; about 3.0M parameters), packed sequences full
of delimiters (`<eos>`, `.`, `,`, newline) that attention heads can use as no-op "sinks",
language-like text or real code (`--corpus`), a large learning rate (6e-3), AdamW (betas 0.9/0.95) with weight decay 0.1 on
the 2-D weights and none on the RMSNorm gains, no dropout. Nothing in the data, the initialisation
or the loss targets outliers: the initialisation is the transformers default and the loss is plain
next-token cross-entropy. Whether outliers actually emerged is measured afterwards with
`bench/outliers.py --base DIR`, not assumed.

Data (deterministic in `--seed`): packed sequences of `--seq-len` ids made of whole documents, each
ending with `<eos>` (only the last one may be cut). A document is, with probability `--text-frac`, a
text document of the `--corpus`, otherwise one example of the demo's pretraining mix
(`hf_roste.demo.tasks.pretrain_example`). Corpora:

- `grammar` (default; generated in code, no files read): a paragraph of a small probabilistic
  English-like grammar (`grammar_paragraph`).
- `python-stdlib`: natural, human-written text (code, comments, docstrings) read from the running
  Python's standard library (`sysconfig.get_paths()["stdlib"]`): all `*.py` files sorted by relative
  path, except those under a directory named `test`, `tests`, `idlelib` or `site-packages` and files
  over 200 kB. Every 20th file in that order is held out (never trained on) for evaluation. A document
  is a chunk of up to `--seq-len - 1` characters of one training file, starting at a line start drawn
  uniformly over all characters. The corpus is deterministic for a given Python installation; its
  version, file and character counts are recorded in `pretrain_info.json` (Python 3.11.7: 639 training
  files, 9.9M characters; 33 held-out files, 0.46M characters). Newline is not in the char tokenizer's
  vocabulary: it maps to `<unk>` (id 3), as do tabs and non-ASCII characters, which are rare (in
  Python 3.11.7's selection: 284,674 newlines, no tab, 202 other characters), so `<unk>` acts as a
  consistent newline token.

The tokenizer is the demo's character tokenizer (vocab 128), so the demo's held-out task,
`bench/outliers.py` and `bench/quality.py` run on the result unchanged (`--base DIR`). By default no `<bos>` is added: the demo's evaluation and fine-tuning never
add one, so every sequence starts with the first character of a document, as the demo's prompts do.
With `--bos`, every packed sequence instead starts with the tokenizer's `<bos>` (`BOS_ID`) followed by
`--seq-len - 1` ids of packed documents (same total length), so the model always sees a fixed first
token that attention can use as a sink; `<bos>` is never a prediction target (labels are shifted by
one). A `--bos` base must then be fine-tuned and evaluated with `<bos>` prepended too (the final
answer/text losses in `pretrain_info.json` are computed with `<bos>` prepended in that case).

Cost: about 0.55 s per step on one free core, so 3000 steps take about 30 min; the measured
default run took 2745 s on a shared 2-core machine (`--threads` sets `torch.set_num_threads`).

Measured outcome of the defaults (one run, seed 4321, shared machine; docs/outlier_experiment.md): residual outliers grew
only moderately (q_proj / gate_proj input max/median per token at most ~90-100 at layer 0 and ~30-45
in the middle layers), and W4A4KV4 RTN did not degrade the demo's held-out task after FP SFT. The
configuration therefore does NOT reproduce the paper's RTN collapse. The same defaults with `--bos`
(3000 steps, 1829 s on one thread) made `<bos>` a sink in the same residual channel as `<eos>`, but only
about 18-27x the median |h|. q_proj inputs reached at most ~56 (layer 0) and ~41 (middle layers), and RTN
again did not hurt after SFT. With `--bos --corpus python-stdlib --heads 4 --kv-heads 2 --steps 5000`
(3278 s on one thread) gate_proj inputs on held-out code reached 74-170 in layers 0-3 (at space
characters), q_proj stayed at most ~48 in the middle layers, and W4A4KV4 RTN raised the held-out code
loss only from 0.915 to 0.959 (rotation + RTN 0.935) and cost nothing after SFT: still not the paper's
collapse. Wider, with `--bos --corpus python-stdlib --hidden 256 --layers 6 --heads 8 --kv-heads 4
--intermediate 1024 --steps 2800` (3069 s on one thread): q_proj at most ~30 and gate_proj ~21, the `<bos>`
sink 40-49x the median |h|; RTN raised held-out code loss from 1.130 to 1.172 (rotation + RTN 1.142) and,
after SFT, cost 1.5-9 exact-match points on each of 3 SFT seeds (rotation + RTN recovered 2 of the 3):
measurable, still not the paper's collapse. The script is kept so the experiment can be rerun or
extended (more steps, other sizes).

Outputs in `--output`: bf16 safetensors via `save_pretrained`, the demo's tokenizer files, and
`pretrain_info.json` (model config, hyperparameters, corpus and data description, wall time, loss
history, final answer loss per demo task, final text loss: on fresh grammar text for `grammar`, on 64
sequences of held-out files and of training files for `python-stdlib`).

    python bench/pretrain_outlier_base.py --output bench/bases/outlier_base [--steps N] [--seed S]
        [--threads T] [--layers L] [--hidden H] [--intermediate I] [--lr LR] [--seq-len N]
        [--batch-size B] [--text-frac F] [--save-every N] [--bos] [--corpus {grammar,python-stdlib}]
        [--heads H] [--kv-heads K]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hf_roste.demo.pretrain import answer_loss, base_config  # noqa: E402
from hf_roste.demo.tasks import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PRETRAIN_TASKS,
    char_tokenizer,
    encode,
    pretrain_example,
)

DEFAULTS = dict(seed=4321, steps=3000, batch_size=16, seq_len=128, lr=6e-3, warmup=200, weight_decay=0.1,
                layers=12, hidden=128, intermediate=512, heads=2, kv_heads=1, text_frac=0.5, beta2=0.95)

# A tiny English-like grammar. Word lists are deliberately small so that a 5M-parameter char model
# can learn spelling and agreement; sentence templates give frequent delimiters.
_NOUNS = ["cat", "dog", "bird", "child", "king", "river", "house", "tree", "teacher", "farmer", "city",
          "ship", "garden", "letter", "window", "horse", "stone", "friend", "road", "lamp"]
_NAMES = ["Anna", "Tom", "Maria", "Paul", "Lena", "Omar", "Ida", "Sam"]
_ADJ = ["old", "small", "red", "quiet", "happy", "dark", "green", "tall", "cold", "bright", "lazy", "young"]
_VERBS_T = ["sees", "likes", "finds", "carries", "watches", "helps", "follows", "paints", "calls", "opens"]
_VERBS_I = ["sleeps", "runs", "sings", "waits", "falls", "laughs", "works", "rests"]
_ADV = ["slowly", "quickly", "again", "today", "often", "never", "always", "softly"]
_PREP = ["near", "under", "behind", "over", "beside", "in", "on"]
_CONJ = ["and", "but", "because", "while", "so"]


def _np(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(_NAMES)
    det = rng.choice(["the", "the", "a", "every", "that"])
    adj = " ".join(rng.sample(_ADJ, k=rng.choice([0, 0, 1, 1, 2])))
    return " ".join(w for w in (det, adj, rng.choice(_NOUNS)) if w)


def _clause(rng: random.Random) -> str:
    subj = _np(rng)
    if rng.random() < 0.6:
        s = f"{subj} {rng.choice(_VERBS_T)} {_np(rng)}"
    else:
        s = f"{subj} {rng.choice(_VERBS_I)}"
    if rng.random() < 0.35:
        s += f" {rng.choice(_PREP)} {_np(rng)}"
    if rng.random() < 0.3:
        s += f" {rng.choice(_ADV)}"
    return s


def grammar_sentence(rng: random.Random) -> str:
    s = _clause(rng)
    while rng.random() < 0.35:
        s += f", {rng.choice(_CONJ)} {_clause(rng)}"
    s = s[0].upper() + s[1:]
    if rng.random() < 0.15:
        return f'"{s}," said {rng.choice(_NAMES)}.'
    return s + rng.choice([".", ".", ".", "!", "?"])


def grammar_paragraph(rng: random.Random, max_chars: int) -> str:
    """One to four sentences (newline-separated lines of one or two sentences), at most `max_chars`."""
    out = grammar_sentence(rng)
    for _ in range(rng.randint(0, 3)):
        nxt = grammar_sentence(rng)
        sep = "\n" if rng.random() < 0.4 else " "
        if len(out) + 1 + len(nxt) > max_chars:
            break
        out += sep + nxt
    return out[:max_chars]


# A text source draws one text document of at most `max_chars` characters.
TextSource = Callable[[random.Random, int], str]

CORPORA = ("grammar", "python-stdlib")
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
STDLIB_MAX_FILE_BYTES = 200_000
STDLIB_HELD_OUT_EVERY = 20


class CodeCorpus:
    """Contiguous chunks of a fixed list of source files (natural, human-written text).

    `chunk` picks a character position uniformly over all files (so files are weighted by length),
    moves it to the start of the next line of that file and returns up to `max_chars` characters
    from there, never crossing the end of the file."""

    def __init__(self, files: list[tuple[str, str]]):
        self.names = [name for name, _ in files]
        self.texts = [text for _, text in files]
        self.ends: list[int] = []
        total = 0
        for text in self.texts:
            total += len(text)
            self.ends.append(total)

    @property
    def chars(self) -> int:
        return self.ends[-1] if self.ends else 0

    def chunk(self, rng: random.Random, max_chars: int) -> str:
        while True:
            pos = rng.randrange(self.chars)
            i = bisect.bisect_right(self.ends, pos)
            text = self.texts[i]
            start = pos - (self.ends[i] - len(text))
            if start > 0:  # move to the next line start (`start` itself if it already is one)
                newline = text.find("\n", start - 1)
                if newline < 0 or newline + 1 >= len(text):
                    continue  # inside the file's last line: draw again
                start = newline + 1
            return text[start:start + max_chars]

    __call__ = chunk


def python_stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """The running Python's standard-library `*.py` files as (relative path, text), sorted by path.

    Excluded: anything under a directory named `test`, `tests`, `idlelib` or `site-packages` (this
    also drops `lib2to3/tests`) and files over 200 kB."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(base.rglob("*.py"), key=lambda q: q.relative_to(base).as_posix()):
        rel = path.relative_to(base)
        if STDLIB_EXCLUDED_DIRS & set(rel.parts[:-1]) or path.stat().st_size > STDLIB_MAX_FILE_BYTES:
            continue
        out.append((rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")))
    return out


def python_stdlib_corpora(root: str | None = None) -> tuple[CodeCorpus, CodeCorpus]:
    """(training, held-out) corpora: every 20th file in sorted order (indices 19, 39, ...) is held out."""
    files = python_stdlib_files(root)
    held = [f for i, f in enumerate(files) if i % STDLIB_HELD_OUT_EVERY == STDLIB_HELD_OUT_EVERY - 1]
    train = [f for i, f in enumerate(files) if i % STDLIB_HELD_OUT_EVERY != STDLIB_HELD_OUT_EVERY - 1]
    return CodeCorpus(train), CodeCorpus(held)


def document(rng: random.Random, text_frac: float, max_chars: int, text: TextSource = grammar_paragraph) -> list[int]:
    """With probability `text_frac` a text document from `text`, else one demo pretraining example; + `<eos>`."""
    if rng.random() < text_frac:
        return encode(text(rng, max_chars)) + [EOS_ID]
    p, a = pretrain_example(rng)
    return encode(p + a) + [EOS_ID]


def packed_sequence(rng: random.Random, seq_len: int, text_frac: float, bos: bool = False,
                    text: TextSource = grammar_paragraph) -> list[int]:
    """Whole documents packed into `seq_len` ids; the last document may be cut (no padding wasted).

    With `bos`, the sequence is `<bos>` followed by `seq_len - 1` ids of packed documents."""
    ids: list[int] = [BOS_ID] if bos else []
    while len(ids) < seq_len:
        ids += document(rng, text_frac, seq_len - 1, text)
    return ids[:seq_len]


def text_sources(corpus: str) -> tuple[TextSource, dict[str, TextSource], dict]:
    """(training text source, named evaluation text sources, description for pretrain_info.json)."""
    if corpus == "grammar":
        return grammar_paragraph, {"grammar_text_loss": grammar_paragraph}, {
            "name": "grammar", "description": "probabilistic English-like grammar generated in code (grammar_paragraph)"}
    if corpus == "python-stdlib":
        train, held = python_stdlib_corpora()
        return train, {"held_out_code_loss": held, "train_files_code_loss": train}, {
            "name": "python-stdlib",
            "python_version": sys.version.split()[0],
            "stdlib_path": sysconfig.get_paths()["stdlib"],
            "selection": ("*.py files sorted by relative path; excluded: directories named "
                          f"{sorted(STDLIB_EXCLUDED_DIRS)} and files > {STDLIB_MAX_FILE_BYTES} bytes"),
            "train_files": len(train.names), "train_chars": train.chars,
            "held_out_files": len(held.names), "held_out_chars": held.chars,
            "held_out_rule": f"every {STDLIB_HELD_OUT_EVERY}th file in sorted order (0-based index % "
                             f"{STDLIB_HELD_OUT_EVERY} == {STDLIB_HELD_OUT_EVERY - 1})",
            "held_out_names": held.names,
            "document": ("a chunk of up to seq_len - 1 characters of one file, starting at a line start "
                         "(position drawn uniformly over all characters), followed by <eos>"),
            "encoding": ("demo char tokenizer: printable ASCII maps to itself; newline (and the rare tab or "
                         "non-ASCII character) maps to <unk> (id 3), which thus acts as the newline token"),
        }
    raise ValueError(f"unknown corpus {corpus!r}; choose from {CORPORA}")


def make_config(hp: dict):
    cfg = base_config()
    cfg.hidden_size = hp["hidden"]
    cfg.intermediate_size = hp["intermediate"]
    cfg.num_hidden_layers = hp["layers"]
    cfg.num_attention_heads = hp["heads"]
    cfg.num_key_value_heads = hp["kv_heads"]
    cfg.head_dim = hp["hidden"] // hp["heads"]
    cfg.max_position_embeddings = max(256, hp["seq_len"])
    return cfg


@torch.no_grad()
def text_loss(model, n: int = 32, seed: int = 77, seq_len: int = 128, bos: bool = False,
              text: TextSource = grammar_paragraph) -> float:
    """Mean next-token loss on `n` fresh text-only sequences from `text` (starting with `<bos>` if `bos`)."""
    rng = random.Random(seed)
    model.eval()
    ids = torch.tensor([packed_sequence(rng, seq_len, 1.0, bos, text) for _ in range(n)])
    return float(model(ids, labels=ids).loss)


def save(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    char_tokenizer().save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0, help="also save bf16 snapshots to OUTPUT/step-N")
    p.add_argument("--bos", action="store_true", help="start every packed sequence with <bos> (fixed sink token)")
    p.add_argument("--corpus", choices=CORPORA, default="grammar",
                   help="text half of the data: generated grammar or the Python standard library's source")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hp = {k: getattr(args, k) for k in DEFAULTS}
    out = Path(args.output)
    train_text, eval_texts, corpus_info = text_sources(args.corpus)
    torch.manual_seed(hp["seed"])
    from transformers import AutoModelForCausalLM

    cfg = make_config(hp)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"outlier base: {n_params:,} parameters, {hp}, bos={args.bos}, corpus={args.corpus}", flush=True)
    # GPT-style AdamW: weight decay on the 2-D weights (linears, embeddings, head) only, never on the
    # RMSNorm gains; Adam betas (0.9, beta2).
    decay = [q for q in model.parameters() if q.ndim >= 2]
    no_decay = [q for q in model.parameters() if q.ndim < 2]
    groups = [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, hp["beta2"]))

    def lr_at(step: int) -> float:  # linear warm-up, cosine to 10%
        if step < hp["warmup"]:
            return (step + 1) / hp["warmup"]
        t = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(hp["seed"])
    history = []
    t0 = time.perf_counter()
    for step in range(hp["steps"]):
        model.train()
        ids = torch.tensor([packed_sequence(rng, hp["seq_len"], hp["text_frac"], args.bos, train_text)
                            for _ in range(hp["batch_size"])])
        loss = model(ids, labels=ids.masked_fill(ids == PAD_ID, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == hp["steps"]:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "grad_norm": round(float(gnorm), 3),
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < hp["steps"]:
            save(model, out / f"step-{step + 1}")
    seconds = time.perf_counter() - t0
    prefix = [BOS_ID] if args.bos else None
    per_task = {t: round(answer_loss(model, n=64, task=t, prefix=prefix), 4) for t in PRETRAIN_TASKS}
    text_losses = {key: round(text_loss(model, n=64, seq_len=hp["seq_len"], bos=args.bos, text=src), 4)
                   for key, src in eval_texts.items()}
    save(model, out)
    info = {
        "script": "bench/pretrain_outlier_base.py",
        "hyperparameters": hp,
        "bos": args.bos,
        "corpus": corpus_info,
        "model_config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads", "head_dim",
                                                      "vocab_size", "max_position_embeddings", "tie_word_embeddings")},
        "parameters": n_params,
        "data": (f"sampled with seed {hp['seed']}: packed sequences of {hp['seq_len']} ids; each document is a "
                 f"{args.corpus} text document with probability {hp['text_frac']} else one demo pretraining-mix "
                 "example; "
                 "every document ends with <eos>; "
                 + (f"every sequence starts with <bos> (id {BOS_ID}) followed by {hp['seq_len'] - 1} ids of packed documents; "
                    if args.bos else "no <bos>; ")
                 + "loss on every position" + (" (<bos> is never a target)" if args.bos else "")),
        "optimizer": f"AdamW(betas=(0.9, {hp['beta2']}), weight_decay={hp['weight_decay']} on 2-D weights, 0 on norm "
                     "gains), grad clip 1.0, "
                     "linear warm-up then cosine to 10%",
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "final_train_loss": history[-1]["loss"],
        "answer_loss_per_task": per_task,
        **text_losses,
        "loss_history": history,
    }
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} after {seconds:.0f}s; answer loss per task {per_task}; text losses {text_losses}", flush=True)


if __name__ == "__main__":
    main()
