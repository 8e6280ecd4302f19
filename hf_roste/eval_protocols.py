"""Named evaluation protocols: fixed settings that reproduce a paper's numbers exactly.

`roste-paper` is the TL;DR evaluation of the RoSTE authors' `eval_tldr.py` (Hong-Lab-UMN-ECE/RoSTE):

- data: `trl-lib/tldr`, split `test`, the first 6,528 items (in order);
- prompts: the raw `prompt` text (no chat template), tokenized with truncation to 512 tokens keeping the
  *start* of the prompt (the tokenizer's default right truncation), padded on the left to exactly 512
  tokens with the eos token;
- decoding: greedy, 32 new tokens, `pad_token_id` = eos;
- prediction: the whole decoded sequence (prompt and generation, special tokens skipped), cut after the
  first "TL;DR:" (the text after it, stripped; the whole text stripped when a truncated prompt lost it);
- references: the raw `completion` text;
- ROUGE: HF `evaluate`'s "rouge" metric with its defaults: no stemmer, the `rouge-score` tokenizer, the
  bootstrap aggregate (mid F1) of ROUGE-1/2/L/Lsum; the authors called `set_seed(2024)` first, so the
  bootstrap's numpy draw is seeded with 2024 here. The metric script of `evaluate` only wraps `rouge-score`
  (`RougeScorer` + `BootstrapAggregator`), so that is called directly: nothing is downloaded at run time.
  The plain mean over items is reported too.

`hf-roste eval --task rouge` (the default protocol) differs on purpose: it stems, keeps the end of an
over-long prompt, decodes only the new tokens and evaluates the whole split; its numbers are therefore not
comparable with the paper's table, while `--protocol roste-paper` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass(frozen=True)
class EvalProtocol:
    """Every setting of a fixed evaluation; `sources` cites where each value comes from."""

    name: str
    dataset: str
    split: str
    max_samples: int
    prompt_length: int  # prompts are truncated (start kept) and left-padded to exactly this many tokens
    max_new_tokens: int
    use_stemmer: bool
    summary_marker: str  # the prediction is the decoded text after the first occurrence of this marker
    bootstrap_seed: int
    dtype: str
    sources: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = dict(self.sources)
        return d


_EVAL = "Hong-Lab-UMN-ECE/RoSTE eval_tldr.py"
ROSTE_PAPER = EvalProtocol(
    name="roste-paper",
    dataset="trl-lib/tldr",
    split="test",
    max_samples=6528,
    prompt_length=512,
    max_new_tokens=32,
    use_stemmer=False,
    summary_marker="TL;DR:",
    bootstrap_seed=2024,
    dtype="bfloat16",
    sources=(
        ("dataset", f'{_EVAL}: load_dataset("trl-lib/tldr")'),
        ("split", f'{_EVAL}: dataset["test"]'),
        ("max_samples", f"{_EVAL}: .select(range(6528))"),
        ("prompt_length", f'{_EVAL}: tokenizer(inputs, max_length=512, truncation=True, padding="max_length"), '
                          'padding_side="left", pad_token = eos_token'),
        ("max_new_tokens", f"{_EVAL}: generate(..., max_new_tokens=32) (greedy: no sampling arguments)"),
        ("use_stemmer", f'{_EVAL}: evaluate.load("rouge").compute(predictions, references) (default use_stemmer=False)'),
        ("summary_marker", f'{_EVAL}: extract_tldr, keyword = "TL;DR:"'),
        ("bootstrap_seed", f"{_EVAL}: set_seed(2024); evaluate's default use_aggregator=True (bootstrap, mid F1)"),
        ("dtype", f'{_EVAL}: from_pretrained(model_dir, torch_dtype="auto") of checkpoints trained with bf16 '
                  "weights (configs/recipes/*.yaml bf16: True)"),
    ),
)
PROTOCOLS: dict[str, EvalProtocol] = {ROSTE_PAPER.name: ROSTE_PAPER}


def extract_summary(text: str, marker: str) -> str:
    """The text after the first `marker`, stripped; the whole text stripped when `marker` is absent."""
    return text.split(marker, 1)[1].strip() if marker in text else text.strip()


def _device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_paper_predictions(model, tokenizer, prompts: Sequence[str], protocol: EvalProtocol = ROSTE_PAPER, *,
                               batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy generations under `protocol`: prompts truncated (start kept) and left-padded to `prompt_length`
    with eos, the whole decoded sequence cut at `summary_marker`."""
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise ValueError(f"Protocol {protocol.name!r} pads with the eos token, but the tokenizer has none.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    saved = (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "right"
    tokenizer.pad_token = tokenizer.eos_token
    device = _device(model)
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=protocol.name, disable=not progress):
            enc = tokenizer(list(prompts[start:start + batch_size]), max_length=protocol.prompt_length, truncation=True,
                            padding="max_length", return_attention_mask=True, return_tensors="pt").to(device)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=protocol.max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            predictions.extend(extract_summary(t, protocol.summary_marker) for t in texts)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token = saved
        model.train(was_training)
    return predictions


def paper_rouge(predictions: Sequence[str], references: Sequence[str], protocol: EvalProtocol = ROSTE_PAPER
                ) -> dict[str, Any]:
    """ROUGE as HF `evaluate`'s "rouge" metric computes it by default (bootstrap mid F1, x 100), plus the plain
    mean over items; computed with `rouge-score`, the package that metric wraps."""
    import numpy as np

    if len(predictions) != len(references) or not predictions:
        raise ValueError("paper_rouge needs as many predictions as references (at least one).")
    try:
        from rouge_score import rouge_scorer, scoring
    except ImportError:
        raise ImportError("The roste-paper protocol needs the rouge-score package: pip install hf-roste[eval] "
                          "(or pip install rouge-score).") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=protocol.use_stemmer)
    per_item = [scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)]
    # evaluate's "rouge" metric script does exactly this (RougeScorer + BootstrapAggregator, mid F1); calling
    # rouge-score directly avoids downloading that script at run time
    np.random.seed(protocol.bootstrap_seed)
    aggregator = scoring.BootstrapAggregator()
    for s in per_item:
        aggregator.add_scores(s)
    result = aggregator.aggregate()
    boot = {k: float(result[k].mid.fmeasure) for k in ROUGE_TYPES}
    out: dict[str, Any] = {k: 100.0 * boot[k] for k in ROUGE_TYPES}
    out["rouge_avg"] = sum(out[k] for k in ROUGE_TYPES) / len(ROUGE_TYPES)
    means = {k: 100.0 * sum(s[k].fmeasure for s in per_item) / len(per_item) for k in ROUGE_TYPES}
    out["mean_over_items"] = {**means, "rouge_avg": sum(means.values()) / len(ROUGE_TYPES)}
    return out


def evaluate_protocol(protocol: EvalProtocol, model, tokenizer, dataset, *, batch_size: int = 8,
                      progress: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    """Run `protocol` on `dataset` (the protocol's split, already loaded): scores, sample count, settings."""
    n = len(dataset)
    if n < protocol.max_samples:
        raise ValueError(f"Protocol {protocol.name!r} evaluates the first {protocol.max_samples} items of "
                         f"{protocol.dataset}:{protocol.split}, but the dataset given has only {n}.")
    rows = dataset.select(range(protocol.max_samples)) if hasattr(dataset, "select") else dataset[: protocol.max_samples]
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"] for r in rows]
    if not all(isinstance(p, str) for p in prompts + references):
        raise ValueError(f"Protocol {protocol.name!r} needs plain-text 'prompt' and 'completion' columns.")
    preds = generate_paper_predictions(model, tokenizer, prompts, protocol, batch_size=batch_size, progress=progress)
    out = {**paper_rouge(preds, references, protocol), "samples": len(preds), "protocol": protocol.to_dict()}
    if return_predictions:
        out["predictions"] = preds
    return out
