"""End-to-end check of the GGUF export with llama.cpp itself (through llama-cpp-python).

    python -m bench.verify_llama_cpp --out verify-llama-cpp [--steps 200 --prompts 64]

1. QA-SFT of the shipped demo base (`hf_roste/data/demo_base`) on the demo's held-out task with
   `RoSTEConfig.for_target("llama.cpp-q4_0")` (or `--model DIR`: a RoSTE folder trained for it);
2. `export_gguf` of the saved packed model (Q4_0 blocks taken from the trained codes);
3. the same prompts through llama.cpp (greedy, token ids fed directly, no sampling) and through the
   packed hf_roste model run as **W4A8** (int8 per-token activations; llama.cpp quantizes activations
   to 8-bit blocks of 32 in its Q4_0 dot products) and as W4A16 (what training saw);
4. reports the identical-greedy-generation rate, exact match against the references, and the max
   next-token logit difference over every generated position, absolute and relative to the HF
   logits' range at that position. Targets (issue 20): >= 95% identical generations, max logit
   difference <= 2% of the range.

llama-cpp-python must be installed (`pip install llama-cpp-python`, it builds llama.cpp from source).
The last output line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def _train(out: Path, steps: int, seed: int) -> Path:
    from hf_roste import RoSTEConfig
    from hf_roste.demo.run import DATA_SEED, DemoSettings, _dataset, _train_qa, shipped_base_path
    from hf_roste.demo.tasks import char_tokenizer, held_out_split

    settings = DemoSettings(output_dir=str(out), steps=steps)
    eval_pairs = held_out_split(settings.eval_prompts, DATA_SEED + 1)
    train_pairs = held_out_split(settings.train_examples, DATA_SEED, exclude={p for p, _ in eval_pairs})
    tok = char_tokenizer()
    qc = RoSTEConfig.for_target("llama.cpp-q4_0")
    model, seconds, losses, _ = _train_qa(settings, shipped_base_path(), _dataset(train_pairs), tok, out, seed, qc)
    folder = out / "roste-llama.cpp-q4_0"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (out / "train_log.json").write_text(json.dumps({"seconds": seconds, "losses": losses, "steps": steps}) + "\n")
    print(f"trained {steps} steps in {seconds:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return folder


def _set_activation_bits(model, bits: int) -> None:
    from hf_roste.modules.packed_linear import PackedLinear
    from hf_roste.numerics import QuantSpec

    spec = QuantSpec(bits, True, 1.0, "token") if bits < 16 else QuantSpec(16)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.act_spec = spec
            m.invalidate_cache()


@torch.no_grad()
def _hf_run(model, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and the logits at every generated position (prompt end + each new token but the last)."""
    gens, logits = [], []
    for ids, n in zip(prompts, lengths, strict=True):
        seq = list(ids)
        rows = []
        for _ in range(n):
            out = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            rows.append(out)
            seq.append(int(out.argmax()))
        gens.append(seq[len(ids):])
        logits.append(torch.stack(rows))
    return gens, logits


def _llama_run(llm, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    import numpy as np

    gens, logits = [], []
    for ids, n in zip(prompts, lengths, strict=True):
        llm.reset()
        llm.eval(list(ids))
        rows, new = [], []
        for _ in range(n):
            row = torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
            rows.append(row)
            tok = int(row.argmax())
            new.append(tok)
            llm.eval([tok])
        gens.append(new)
        logits.append(torch.stack(rows))
    return gens, logits


def _compare(ref_gen, ref_logits, gen, logits, references) -> dict:
    same = sum(int(a == b) for a, b in zip(ref_gen, gen, strict=True))
    max_abs, max_rel = 0.0, 0.0
    for r, x in zip(ref_logits, logits, strict=True):
        n = min(len(r), len(x))  # positions reached by both (identical prefixes make them the same contexts)
        d = (r[:n] - x[:n]).abs().amax(dim=-1)
        rng = r[:n].amax(dim=-1) - r[:n].amin(dim=-1)
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float((d / rng).max()))
    first = [float((r[0] - x[0]).abs().max() / (r[0].max() - r[0].min())) for r, x in zip(ref_logits, logits, strict=True)]
    return {"identical_generation_rate": same / len(gen), "max_logit_abs_diff": max_abs,
            "max_logit_diff_over_range": max_rel, "max_first_token_logit_diff_over_range": max(first),
            "exact_match": sum(int(g == t) for g, t in zip(gen, references, strict=True)) / len(gen)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="verify-llama-cpp", help="Work folder (trained model, GGUF file, report).")
    p.add_argument("--model", default=None, help="A RoSTE folder trained for llama.cpp-q4_0 (skips training).")
    p.add_argument("--steps", type=int, default=200, help="QA-SFT steps when training here.")
    p.add_argument("--prompts", type=int, default=64, help="Held-out prompts compared.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp from source).",
              file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from hf_roste.demo.run import DATA_SEED
    from hf_roste.demo.tasks import EOS_ID, encode, held_out_split
    from hf_roste.export.gguf import export_gguf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.model) if args.model else _train(out, args.steps, args.seed)
    gguf_file = out / "model-q4_0.gguf"
    summary = export_gguf(folder, gguf_file)
    pairs = held_out_split(1000, DATA_SEED + 1)[: args.prompts]
    prompts = [encode(q) for q, _ in pairs]
    references = [encode(a) + [EOS_ID] for _, a in pairs]
    lengths = [len(r) for r in references]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results: dict = {}
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_batch=256, logits_all=True, n_threads=args.threads,
                          verbose=False, seed=args.seed)
    cpp_gen, cpp_logits = _llama_run(llm, prompts, lengths)
    llama_seconds = time.perf_counter() - t0
    for name, bits in (("hf_roste_w4a8", 8), ("hf_roste_w4a16", 16)):
        _set_activation_bits(model, bits)
        gen, logits = _hf_run(model, prompts, lengths)
        results[name] = {"exact_match": sum(int(g == t) for g, t in zip(gen, references, strict=True)) / len(gen),
                         "llama_cpp_vs_this": _compare(gen, logits, cpp_gen, cpp_logits, references)}
    w4a8 = results["hf_roste_w4a8"]["llama_cpp_vs_this"]
    report = {
        "benchmark": "verify_llama_cpp",
        "model": str(folder),
        "gguf": {k: summary[k] for k in ("file_type", "tensors", "architecture")},
        "gguf_bytes": os.path.getsize(gguf_file),
        "prompts": len(prompts),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "llama_cpp_seconds": llama_seconds,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "results": results,
        "llama_cpp_exact_match": sum(int(g == t) for g, t in zip(cpp_gen, references, strict=True)) / len(cpp_gen),
        "targets": {"identical_generation_rate_min": 0.95, "max_logit_diff_over_range_max": 0.02},
        "meets_targets": w4a8["identical_generation_rate"] >= 0.95 and w4a8["max_logit_diff_over_range"] <= 0.02,
    }
    (out / "verify_llama_cpp.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
