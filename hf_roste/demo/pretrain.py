"""Pre-train the demo's base model in full precision (`hf-roste demo --pretrain`).

A Llama-shaped model (hidden 256, 4 layers, 4 heads of 64 with 2 KV heads, intermediate 512, vocab
128, untied embeddings; 2,427,136 parameters) trained from scratch with AdamW on the synthetic mix of
`tasks.py` (packed sequences of whole examples, loss on every non-pad token). The shipped checkpoint
in `hf_roste/data/demo_base/` was produced by this function with its defaults.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from .tasks import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PRETRAIN_TASKS,
    VOCAB_SIZE,
    char_tokenizer,
    encode,
    pretrain_example,
    pretrain_sequence,
)

PRETRAIN_DEFAULTS = dict(seed=1234, steps=2400, batch_size=16, seq_len=64, lr=3e-3, warmup=100, weight_decay=0.01)


def base_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=VOCAB_SIZE, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, rms_norm_eps=1e-5,
    )


def batch(rng: random.Random, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([pretrain_sequence(rng, seq_len) for _ in range(batch_size)])
    labels = ids.masked_fill(ids == PAD_ID, -100)
    return ids, labels


@torch.no_grad()
def answer_loss(model, n: int = 64, seed: int = 99, task: str | None = None, prefix: list[int] | None = None) -> float:
    """Mean cross-entropy on the answer tokens (+ eos) of `n` fresh pretraining examples.

    ``prefix``: token ids put before every example (e.g. ``[BOS_ID]``), never scored.
    """
    rng = random.Random(seed)
    total, count = 0.0, 0
    prefix = list(prefix or [])
    model.eval()
    for _ in range(n):
        p, a = pretrain_example(rng, task)
        ids = torch.tensor([prefix + encode(p + a) + [EOS_ID]])
        labels = ids.clone()
        labels[0, : len(prefix) + len(p)] = -100
        out = model(ids, labels=labels)
        k = int((labels[0, 1:] != -100).sum())
        total += float(out.loss) * k
        count += k
    return total / count


def pretrain_base(output_dir: str | Path, steps: int | None = None, seed: int | None = None, log_every: int = 100) -> Path:
    """Train the base from scratch and save it (bf16 safetensors + tokenizer + README facts)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    hp = dict(PRETRAIN_DEFAULTS)
    if steps is not None:
        hp["steps"] = steps
    if seed is not None:
        hp["seed"] = seed
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(hp["seed"])
    model = AutoModelForCausalLM.from_config(base_config(), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining the demo base: {n_params:,} parameters, {hp}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < hp["warmup"]:
            return (step + 1) / hp["warmup"]
        t = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(hp["seed"])
    t0 = time.perf_counter()
    history = []
    bar = tqdm(range(hp["steps"]), desc="pretrain base (fp32)", mininterval=5)
    for step in bar:
        model.train()
        ids, labels = batch(rng, hp["batch_size"], hp["seq_len"])
        loss = model(ids, attention_mask=(ids != PAD_ID).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % log_every == 0 or step + 1 == hp["steps"]:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
    seconds = time.perf_counter() - t0
    per_task = {t: round(answer_loss(model, n=64, task=t), 4) for t in PRETRAIN_TASKS}
    model.to(torch.bfloat16).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    facts = {"hyperparameters": hp, "parameters": n_params, "train_seconds": round(seconds, 1),
             "answer_loss_per_task": per_task, "loss_history": history}
    (out / "pretrain_log.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(f"saved the base to {out} after {seconds:.0f}s; answer loss per task: {per_task}", flush=True)
    return out
