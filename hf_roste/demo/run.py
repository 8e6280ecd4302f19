"""The demo's comparison: FP SFT, SFT + RTN, SFT + rotation + RTN, STE QA-SFT and RoSTE QA-SFT.

Everything printed or written is measured in the run. Steps, per seed and per bit setting:

1. FP SFT: TRL `SFTTrainer` on the held-out task, from the shipped base.
2. SFT + RTN: the FP SFT output loaded with `RoSTEConfig(rotations=(), rotation_search="none")`.
3. SFT + rotation + RTN (QuaRot-style): the FP SFT output with `RoSTEConfig(rotation_search="all")`.
4. STE QA-SFT: `RoSTESFTTrainer` with `RoSTEConfig(rotations=(), rotation_search="none")` from the base.
5. RoSTE QA-SFT: `RoSTESFTTrainer` with `RoSTEConfig()` (adaptive rotation search) from the base.

Each model is evaluated on the same held-out prompts: completion loss (teacher-forced cross-entropy on
the completion tokens and `<eos>`, token-weighted mean) and greedy exact match (batched
`generate`). Prompts are bucketed by length, so no batch holds padding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .report import METHOD_LABELS
from .tasks import EOS_ID, char_tokenizer, decode, encode, held_out_split

METHODS = ("fp_sft", "sft_rtn", "sft_rot_rtn", "ste", "roste")
SCHEMES = {"W4A4KV4": 4, "W3A3KV3": 3}
DATA_SEED = 20250213  # the train / eval split is the same for every seed; seeds change init order, shuffling, signs


def shipped_base_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "demo_base"


@dataclass
class DemoSettings:
    output_dir: str = "roste-demo"
    seeds: int = 2
    steps: int = 320  # QA-SFT needs ~300 steps here to beat PTQ; 80 left it undertrained (measured)
    batch_size: int = 16
    learning_rate: float = 2e-3
    train_examples: int = 3000
    eval_prompts: int = 1000
    calibration_samples: int = 32
    stress: bool = False
    quick: bool = False
    base: str | None = None
    reload_check_prompts: int = 128
    schemes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.schemes:
            self.schemes = ["W4A4KV4"] + (["W3A3KV3"] if self.stress else [])


def _bytes_and_files(folder: Path) -> tuple[int, list[dict]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rows = [{"file": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files]
    return sum(r["bytes"] for r in rows), rows


def _buckets(pairs: list[tuple[str, str]]) -> dict[tuple[int, int], list[tuple[str, str]]]:
    out: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for p, c in pairs:
        out.setdefault((len(p), len(c)), []).append((p, c))
    return dict(sorted(out.items()))


@torch.no_grad()
def evaluate(model, pairs: list[tuple[str, str]], batch_size: int = 256, desc: str = "eval",
             prefix: Sequence[int] = ()) -> dict:
    """Completion loss and greedy exact match on `pairs` (no padding: batches share one length).

    `prefix` token ids are put in front of every prompt (e.g. `[BOS_ID]` for a base pre-trained with
    `<bos>`); they are part of the prompt, never scored."""
    from tqdm.auto import tqdm

    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    chunks = []
    for (lp, lc), rows in _buckets(pairs).items():
        for i in range(0, len(rows), batch_size):
            chunks.append((lp, lc, rows[i : i + batch_size]))
    for lp, lc, rows in tqdm(chunks, desc=desc, leave=False, mininterval=2):
        ids = torch.tensor([[*prefix, *encode(p + c), EOS_ID] for p, c in rows])
        lp += len(prefix)
        logits = model(input_ids=ids).logits.float()
        pred, target = logits[:, lp - 1 : -1], ids[:, lp:]
        loss_sum += float(torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                                            reduction="sum"))
        tokens += target.numel()
        prompts = ids[:, :lp]
        gen = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=lc + 1,
                             min_new_tokens=lc + 1, do_sample=False, pad_token_id=0, eos_token_id=None)
        new = gen[:, lp : lp + lc + 1]
        correct += int((new == target).all(dim=1).sum())
    return {"completion_loss": loss_sum / tokens, "exact_match": correct / len(pairs), "prompts": len(pairs),
            "completion_tokens": tokens}


@torch.no_grad()
def greedy_tokens(model, pairs: list[tuple[str, str]]) -> list[list[int]]:
    out = []
    model.eval()
    for (lp, lc), rows in _buckets(pairs).items():
        prompts = torch.tensor([encode(p) for p, _ in rows])
        gen = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=lc + 1,
                             min_new_tokens=lc + 1, do_sample=False, pad_token_id=0, eos_token_id=None)
        out += gen[:, lp:].tolist()
    return out


def _dataset(pairs, prompt_prefix: str = ""):
    """Prompt-completion dataset; `prompt_prefix` (e.g. `"<bos>"`, one token for the char tokenizer) starts every prompt."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [prompt_prefix + p for p, _ in pairs], "completion": [c for _, c in pairs]})


def _common_args(s: DemoSettings, out: Path, seed: int) -> dict:
    return dict(output_dir=str(out), max_steps=s.steps, per_device_train_batch_size=s.batch_size,
                learning_rate=s.learning_rate, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                logging_steps=max(1, s.steps // 5), report_to="none", save_strategy="no", use_cpu=True,
                bf16=False, fp16=False, gradient_checkpointing=False, seed=seed, data_seed=seed, max_length=64,
                dataloader_num_workers=0, disable_tqdm=False, completion_only_loss=True)


def _load(path, qc=None):
    from transformers import AutoModelForCausalLM

    kw = {"quantization_config": qc} if qc is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)


def _roste_config(scheme: str, kind: str):
    from ..config import RoSTEConfig

    b = SCHEMES[scheme]
    bits = dict(weight_bits=b, activation_bits=b, kv_bits=b)
    if kind == "none":
        return RoSTEConfig(rotations=(), rotation_search="none", **bits)
    if kind == "all":
        return RoSTEConfig(rotation_search="all", **bits)
    return RoSTEConfig(**bits)


def _train_fp(s: DemoSettings, base: Path, train_ds, tok, out: Path, seed: int):
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    model = _load(base)
    trainer = SFTTrainer(model=model, args=SFTConfig(**_common_args(s, out / "trainer", seed)),
                         train_dataset=train_ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    return trainer.model, time.perf_counter() - t0, _losses(trainer)


def _train_qa(s: DemoSettings, base: Path, train_ds, tok, out: Path, seed: int, qc):
    from ..training import RoSTESFTConfig, RoSTESFTTrainer

    torch.manual_seed(seed)
    model = _load(base, qc)
    args = RoSTESFTConfig(**_common_args(s, out / "trainer", seed), rotation_calibration_samples=s.calibration_samples,
                          log_quantization_error=False)
    trainer = RoSTESFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()  # includes the rotation search when the config asks for it
    seconds = time.perf_counter() - t0
    rc = trainer.model.config.quantization_config.rotation_config
    return trainer.model, seconds, _losses(trainer), rc


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _save(model, tok, folder: Path) -> tuple[int, list[dict]]:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return _bytes_and_files(folder)


def _rotation_summary(rc) -> str | None:
    if not rc:
        return None
    layers = rc["layers"]
    on = {k: sum(int(layer[k]) for layer in layers) for k in ("R2", "R3", "R4")}
    return f"R1={'on' if rc['R1'] else 'off'}, " + ", ".join(f"{k} on in {v}/{len(layers)} layers" for k, v in on.items())


def _reload_check(model, folder: Path, pairs) -> dict:
    """Reload the saved RoSTE model with `from_pretrained` and compare greedy generations."""
    from transformers import AutoModelForCausalLM

    from ..state import get_state

    before = greedy_tokens(model, pairs)
    t0 = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    load_s = time.perf_counter() - t0
    after = greedy_tokens(reloaded, pairs)
    same = sum(a == b for a, b in zip(before, after, strict=True))
    state = get_state(reloaded)
    sample = [(p, decode(g)) for (p, _), g in list(zip(pairs, after, strict=True))[:3]]
    return {"prompts": len(pairs), "identical_generations": same, "all_identical": same == len(pairs),
            "reloaded_packed": bool(state.packed), "load_seconds": load_s, "samples": sample}


def run_comparison(s: DemoSettings) -> dict:
    """Run the whole comparison; return the results dict (also written as JSON / Markdown / PNG)."""
    from .report import aggregate, print_table, write_outputs

    wall0 = time.perf_counter()
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(s.base) if s.base else shipped_base_path()
    if not (base / "config.json").is_file():
        raise SystemExit(f"hf-roste demo: the base checkpoint {base} is missing; run `hf-roste demo --pretrain`.")
    tok = char_tokenizer()
    eval_pairs = held_out_split(s.eval_prompts, DATA_SEED + 1)
    train_pairs = held_out_split(s.train_examples, DATA_SEED, exclude={p for p, _ in eval_pairs})
    train_ds = _dataset(train_pairs)
    reload_pairs = eval_pairs[: s.reload_check_prompts]
    n_params = sum(p.numel() for p in _load(base).parameters())
    print(f"hf-roste demo: base {base} ({n_params:,} parameters, pre-trained in full precision on the synthetic mix)")
    print(f"  held-out task 'count(word)=' -> number of letters (held-out format): {len(train_pairs)} training examples, "
          f"{len(eval_pairs)} held-out eval prompts (disjoint)")
    print(f"  settings: seeds={s.seeds}, steps={s.steps}, batch={s.batch_size}, lr={s.learning_rate}, "
          f"schemes={s.schemes}, rotation-search calibration samples={s.calibration_samples}, "
          f"torch threads={torch.get_num_threads()}")
    runs: list[dict] = []
    reload_checks: list[dict] = []
    for seed in range(s.seeds):
        sdir = out / "runs" / f"seed{seed}"
        print(f"\n=== seed {seed} ===")
        print("[FP SFT] TRL SFTTrainer, full precision")
        fp_model, fp_s, fp_losses = _train_fp(s, base, train_ds, tok, sdir / "fp_sft", seed)
        fp_metrics = evaluate(fp_model, eval_pairs, desc="eval FP SFT")
        fp_dir = sdir / "fp_sft" / "model"
        size, _ = _save(fp_model, tok, fp_dir)
        del fp_model
        runs.append({"seed": seed, "scheme": "FP", "method": "fp_sft", **fp_metrics, "checkpoint_bytes": size,
                     "train_seconds": fp_s, "train_losses": fp_losses})
        print(f"  FP SFT: loss {fp_metrics['completion_loss']:.4f}, exact match {fp_metrics['exact_match']:.1%}, "
              f"{fp_s:.1f}s")
        for scheme in s.schemes:
            for method, kind in (("sft_rtn", "none"), ("sft_rot_rtn", "all")):
                print(f"[{METHOD_LABELS[method]} {scheme}] FP SFT output, post-training quantization, no training")
                t0 = time.perf_counter()
                model = _load(fp_dir, _roste_config(scheme, kind))
                prep_s = time.perf_counter() - t0
                metrics = evaluate(model, eval_pairs, desc=f"eval {method} {scheme}")
                size, _ = _save(model, tok, sdir / f"{method}_{scheme}")
                runs.append({"seed": seed, "scheme": scheme, "method": method, **metrics, "checkpoint_bytes": size,
                             "train_seconds": 0.0, "prepare_seconds": prep_s})
                print(f"  loss {metrics['completion_loss']:.4f}, exact match {metrics['exact_match']:.1%}")
                del model
            for method, kind in (("ste", "none"), ("roste", "adaptive")):
                print(f"[{METHOD_LABELS[method]} {scheme}] RoSTESFTTrainer from the base")
                model, secs, losses, rc = _train_qa(s, base, train_ds, tok, sdir / f"{method}_{scheme}", seed,
                                                    _roste_config(scheme, kind))
                metrics = evaluate(model, eval_pairs, desc=f"eval {method} {scheme}")
                folder = sdir / f"{method}_{scheme}" / "model"
                size, files = _save(model, tok, folder)
                row = {"seed": seed, "scheme": scheme, "method": method, **metrics, "checkpoint_bytes": size,
                       "train_seconds": secs, "train_losses": losses, "rotation_config": _rotation_summary(rc)}
                runs.append(row)
                print(f"  loss {metrics['completion_loss']:.4f}, exact match {metrics['exact_match']:.1%}, {secs:.1f}s"
                      + (f"; rotations chosen by the search: {row['rotation_config']}" if method == "roste" else ""))
                if method == "roste":
                    print(f"  saved with save_pretrained to {folder}: {size:,} bytes")
                    for f in files:
                        print(f"    {f['file']:<32} {f['bytes']:>10,} bytes")
                    check = _reload_check(model, folder, reload_pairs)
                    check.update(seed=seed, scheme=scheme, folder=str(folder), checkpoint_bytes=size, files=files)
                    reload_checks.append(check)
                    verdict = "IDENTICAL" if check["all_identical"] else "DIFFERENT"
                    print(f"  reloaded with AutoModelForCausalLM.from_pretrained (packed={check['reloaded_packed']}): "
                          f"greedy generations on {check['prompts']} prompts {verdict} "
                          f"({check['identical_generations']}/{check['prompts']} equal)")
                    for p, g in check["samples"]:
                        print(f"    {p!r} -> {g!r}")
                del model
    result = {
        "settings": asdict(s),
        "base": {"path": str(base), "parameters": n_params},
        "task": {"name": "count", "description": "count(word)= -> number of letters (1..10; held-out format of len)",
                 "train_examples": len(train_pairs), "eval_prompts": len(eval_pairs), "data_seed": DATA_SEED},
        "runs": runs,
        "reload_checks": reload_checks,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    result["rows"], result["noise_rule"] = aggregate(runs, s)
    result["wall_seconds"] = time.perf_counter() - wall0
    print_table(result)
    write_outputs(result, out)
    print(f"\nwall time: {result['wall_seconds']:.1f}s ({result['wall_seconds'] / 60:.1f} min)")
    return result

