"""Evaluation of RoSTE QAT models, saved RoSTE checkpoints and plain full-precision models.

    import hf_roste
    from hf_roste.evaluation import evaluate_rouge, evaluate_exact_match, evaluate_perplexity
    scores = evaluate_rouge(model, tokenizer, dataset, max_new_tokens=32)   # the authors' TL;DR setting

- `evaluate_rouge`: greedy decoding (left-padded batches), ROUGE-1/2/L/Lsum F1 x 100 and their
  average (the paper's TL;DR metric), with the `rouge-score` package (`pip install hf-roste[eval]`).
- `evaluate_exact_match`: greedy completion compared with the reference (whitespace stripped).
- `evaluate_perplexity`: perplexity over the completion tokens only (given the prompt, as in
  completion-only SFT) and over the full sequence.

Datasets: anything indexable of prompt/completion, messages or (perplexity only) text examples,
e.g. `hf_roste.data.load_any_dataset("test.jsonl")`. Nothing here depends on RoSTE: the fake
quantizers run inside the model's forward, so a QAT model is evaluated with the function it was
trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import dataset_format, scored_completion, split_prompt_reference

logger = logging.get_logger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TASKS = ("rouge", "exact-match", "perplexity")


def _require_rouge():
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
        raise ImportError(
            "ROUGE evaluation needs the rouge-score package: pip install hf-roste[eval] (or pip install rouge-score)."
        ) from exc
    return rouge_scorer


def _take(dataset, max_samples: int | None) -> list[dict]:
    n = len(dataset)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples} is invalid: expected None (all) or an int >= 1.")
        n = min(n, max_samples)
    if n == 0:
        raise ValueError("The evaluation dataset is empty.")
    return [dict(dataset[i]) for i in range(n)]


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token: set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token


def _device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 8,
                         max_prompt_length: int | None = None, progress: bool = True, desc: str = "generating",
                         ) -> list[str]:
    """Greedy completions of `prompts` (left padding, batches of `batch_size`), decoded without special tokens."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}.")
    _ensure_pad(tokenizer)
    device = _device(model)
    old_side, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # an over-long prompt keeps its end (the text right before the answer)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            chunk = list(prompts[start:start + batch_size])
            kw: dict[str, Any] = {"truncation": True, "max_length": max_prompt_length} if max_prompt_length else {}
            enc = tokenizer(chunk, return_tensors="pt", padding=True, **kw).to(device)
            enc.pop("token_type_ids", None)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc
        model.train(was_training)
    return outputs


def _prompts_and_references(dataset, tokenizer, max_samples):
    rows = _take(dataset, max_samples)
    fmt = dataset_format(rows[0].keys())
    if fmt not in ("prompt_completion", "messages"):
        raise ValueError(
            f"Generation tasks need 'prompt' + 'completion' or 'messages' examples; this dataset is in {fmt!r} format."
        )
    pairs = [split_prompt_reference(r, tokenizer) for r in rows]
    return [p for p, _ in pairs], [r for _, r in pairs]


def rouge_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 (x 100) and `rouge_avg`, their average (the paper's table)."""
    rouge_scorer = _require_rouge()
    if len(predictions) != len(references) or not predictions:
        raise ValueError("rouge_scores needs as many predictions as references (at least one).")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        # rougeLsum splits summaries into sentences on newlines
        scores = scorer.score(ref.strip(), pred.strip())
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    out = {k: 100.0 * v / len(predictions) for k, v in totals.items()}
    out["rouge_avg"] = sum(out[k] for k in ROUGE_TYPES) / len(ROUGE_TYPES)
    return out


def evaluate_rouge(model, tokenizer, dataset, *, max_new_tokens: int = 32, batch_size: int = 8,
                   max_samples: int | None = None, max_prompt_length: int | None = None, use_stemmer: bool = True,
                   progress: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    """ROUGE of greedy completions against the references (TL;DR: 32 new tokens, the authors' setting).

    Returns `{"rouge1", "rouge2", "rougeL", "rougeLsum", "rouge_avg", "samples"}` (F1 x 100), plus
    `"predictions"` / `"references"` with `return_predictions=True`.
    """
    _require_rouge()
    prompts, refs = _prompts_and_references(dataset, tokenizer, max_samples)
    preds = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 max_prompt_length=max_prompt_length, progress=progress, desc="rouge")
    out: dict[str, Any] = {**rouge_scores(preds, refs, use_stemmer=use_stemmer), "samples": len(preds)}
    if return_predictions:
        out.update(predictions=preds, references=refs)
    return out


def evaluate_exact_match(model, tokenizer, dataset, *, max_new_tokens: int = 32, batch_size: int = 8,
                         max_samples: int | None = None, max_prompt_length: int | None = None, progress: bool = True,
                         return_predictions: bool = False) -> dict[str, Any]:
    """Share (x 100) of greedy completions equal to the reference after stripping whitespace.

    Also reports `prefix_match`: the completion starts with the reference (the model went on
    generating after a correct answer).
    """
    prompts, refs = _prompts_and_references(dataset, tokenizer, max_samples)
    preds = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 max_prompt_length=max_prompt_length, progress=progress, desc="exact-match")
    exact = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True))
    prefix = sum(p.strip().startswith(r.strip()) for p, r in zip(preds, refs, strict=True))
    out: dict[str, Any] = {"exact_match": 100.0 * exact / len(preds), "prefix_match": 100.0 * prefix / len(preds),
                           "samples": len(preds)}
    if return_predictions:
        out.update(predictions=preds, references=refs)
    return out


def _encode_for_perplexity(row: dict, tokenizer, fmt: str, max_length: int | None) -> tuple[list[int], int]:
    """(token ids, index of the first completion token); 0 for text examples (everything counts)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "tokenized":
        ids, start = list(row["input_ids"]), 0
    elif fmt == "text":
        ids, start = list(tokenizer(str(row["text"]))["input_ids"]), 0
    else:
        prompt, reference, rendered = scored_completion(row, tokenizer)
        p_ids = list(tokenizer(prompt)["input_ids"])
        c_ids = list(tokenizer(reference, add_special_tokens=False)["input_ids"])
        if not rendered and (not c_ids or c_ids[-1] not in eos):
            # as TRL's completion-only training appends eos (conversations: the chat template's end of turn,
            # taken from the rendered conversation when possible)
            c_ids = c_ids + eos
        ids, start = p_ids + c_ids, len(p_ids)
    if max_length is not None:
        ids = ids[:max_length]
    return ids, min(start, len(ids))


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, dataset, *, batch_size: int = 8, max_samples: int | None = None,
                        max_length: int | None = 2048, progress: bool = True) -> dict[str, Any]:
    """Token-level perplexity: `perplexity_completion` (completion tokens given the prompt; the
    completion-only SFT objective) and `perplexity_full` (every token after the first).

    Text and pre-tokenized datasets have no prompt, so only `perplexity_full` is reported.
    """
    rows = _take(dataset, max_samples)
    fmt = dataset_format(rows[0].keys())
    _ensure_pad(tokenizer)
    encoded = [_encode_for_perplexity(r, tokenizer, fmt, max_length) for r in rows]
    device = _device(model)
    was_training = model.training
    model.eval()
    nll_full = nll_comp = 0.0
    n_full = n_comp = 0
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc="perplexity", disable=not progress):
            chunk = [e for e in encoded[start:start + batch_size] if len(e[0]) >= 2]
            if not chunk:
                continue
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), int(tokenizer.pad_token_id), dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            comp = torch.zeros_like(input_ids, dtype=torch.bool)
            for r, (ids, c_start) in enumerate(chunk):
                input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, :len(ids)] = 1
                comp[r, c_start:len(ids)] = True
            input_ids, mask, comp = input_ids.to(device), mask.to(device), comp.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = input_ids[:, 1:]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            valid = mask[:, 1:].bool()
            nll_full += nll[valid].sum().item()
            n_full += int(valid.sum())
            c_valid = valid & comp[:, 1:]
            nll_comp += nll[c_valid].sum().item()
            n_comp += int(c_valid.sum())
    finally:
        model.train(was_training)
    if n_full == 0:
        raise ValueError("No example has two or more tokens: nothing to score.")
    out: dict[str, Any] = {"perplexity_full": math.exp(nll_full / n_full), "tokens_full": n_full,
                           "samples": len(rows)}
    if fmt in ("prompt_completion", "messages"):
        if n_comp == 0:
            raise ValueError("Every completion was truncated away: raise max_length.")
        out.update(perplexity_completion=math.exp(nll_comp / n_comp), tokens_completion=n_comp)
    return out


def evaluate(task: str, model, tokenizer, dataset, **kwargs: Any) -> dict[str, Any]:
    """Dispatch on `task` (one of `TASKS`)."""
    if task == "rouge":
        return evaluate_rouge(model, tokenizer, dataset, **kwargs)
    if task == "exact-match":
        return evaluate_exact_match(model, tokenizer, dataset, **kwargs)
    if task == "perplexity":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("max_new_tokens", "max_prompt_length", "use_stemmer",
                                                                 "return_predictions")}
        return evaluate_perplexity(model, tokenizer, dataset, **kwargs)
    raise ValueError(f"Unknown evaluation task {task!r}: expected one of {TASKS}.")


def format_table(results: dict[str, Any], title: str | None = None) -> str:
    """A two-column markdown table of the numeric entries of `results`."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)
