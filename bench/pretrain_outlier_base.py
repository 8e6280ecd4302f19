"""Pre-train a deeper, demo-compatible base on language-like text plus the demo's task mix.

Why: the demo base (4 layers, task mix only) shows outliers only at the `down_proj` inputs; its
residual stream (q_proj / gate_proj inputs) stays flat, so W4A4KV4 round-to-nearest barely hurts it.
This script trains a Llama-shaped model from scratch in a regime where the literature reports
residual outliers / massive activations emerging by themselves: a deeper stack (12 layers,
hidden 128, 2 heads of 64, 1 KV head, intermediate 512; about 3.0M parameters), packed sequences full
of delimiters (`<eos>`, `.`, `,`, newline) that attention heads can use as no-op "sinks",
language-like text, a large learning rate (6e-3), AdamW (betas 0.9/0.95) with weight decay 0.1 on
the 2-D weights and none on the RMSNorm gains, no dropout. Nothing in the data, the initialisation
or the loss targets outliers: the initialisation is the transformers default and the loss is plain
next-token cross-entropy. Whether outliers actually emerged is measured afterwards with
`bench/outliers.py --base DIR`, not assumed.

Data (generated in code, deterministic in `--seed`, no files read): packed sequences of `--seq-len`
ids made of whole documents, each ending with `<eos>` (only the last one may be cut). A document is,
with probability `--text-frac`, a paragraph of a small probabilistic English-like grammar
(`grammar_paragraph`), otherwise one example of the demo's pretraining mix
(`hf_roste.demo.tasks.pretrain_example`). The tokenizer is the demo's character tokenizer (vocab
128), so the demo's held-out task, `bench/outliers.py` and `bench/quality.py` run on the result
unchanged (`--base DIR`). By default no `<bos>` is added: the demo's evaluation and fine-tuning never
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
again did not hurt after SFT. The script is kept so the experiment can be rerun or extended (more steps,
other sizes).

Outputs in `--output`: bf16 safetensors via `save_pretrained`, the demo's tokenizer files, and
`pretrain_info.json` (model config, hyperparameters, data description, wall time, loss history,
final answer loss per demo task, final loss on fresh grammar text).

    python bench/pretrain_outlier_base.py --output bench/bases/outlier_base [--steps N] [--seed S]
        [--threads T] [--layers L] [--hidden H] [--intermediate I] [--lr LR] [--seq-len N]
        [--batch-size B] [--text-frac F] [--save-every N] [--bos]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
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


def document(rng: random.Random, text_frac: float, max_chars: int) -> list[int]:
    if rng.random() < text_frac:
        return encode(grammar_paragraph(rng, max_chars)) + [EOS_ID]
    p, a = pretrain_example(rng)
    return encode(p + a) + [EOS_ID]


def packed_sequence(rng: random.Random, seq_len: int, text_frac: float, bos: bool = False) -> list[int]:
    """Whole documents packed into `seq_len` ids; the last document may be cut (no padding wasted).

    With `bos`, the sequence is `<bos>` followed by `seq_len - 1` ids of packed documents."""
    ids: list[int] = [BOS_ID] if bos else []
    while len(ids) < seq_len:
        ids += document(rng, text_frac, seq_len - 1)
    return ids[:seq_len]


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
def text_loss(model, n: int = 32, seed: int = 77, seq_len: int = 128, bos: bool = False) -> float:
    """Mean next-token loss on `n` fresh grammar-only sequences (starting with `<bos>` if `bos`)."""
    rng = random.Random(seed)
    model.eval()
    ids = torch.tensor([packed_sequence(rng, seq_len, 1.0, bos) for _ in range(n)])
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
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hp = {k: getattr(args, k) for k in DEFAULTS}
    out = Path(args.output)
    torch.manual_seed(hp["seed"])
    from transformers import AutoModelForCausalLM

    cfg = make_config(hp)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"outlier base: {n_params:,} parameters, {hp}, bos={args.bos}", flush=True)
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
        ids = torch.tensor([packed_sequence(rng, hp["seq_len"], hp["text_frac"], args.bos) for _ in range(hp["batch_size"])])
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
    tl = round(text_loss(model, seq_len=hp["seq_len"], bos=args.bos), 4)
    save(model, out)
    info = {
        "script": "bench/pretrain_outlier_base.py",
        "hyperparameters": hp,
        "bos": args.bos,
        "model_config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads", "head_dim",
                                                      "vocab_size", "max_position_embeddings", "tie_word_embeddings")},
        "parameters": n_params,
        "data": (f"generated in code (seed {hp['seed']}): packed sequences of {hp['seq_len']} ids; each document is a "
                 f"grammar paragraph with probability {hp['text_frac']} else one demo pretraining-mix example; "
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
        "grammar_text_loss": tl,
        "loss_history": history,
    }
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} after {seconds:.0f}s; answer loss per task {per_task}; grammar text loss {tl}", flush=True)


if __name__ == "__main__":
    main()
