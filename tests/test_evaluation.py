"""hf_roste.evaluation on odd inputs: prompt truncation side, conversational perplexity, calibration splits."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny_data import char_tokenizer, messages_dataset
from tiny_models import build_tiny

from hf_roste import sample_calibration_batches
from hf_roste.evaluation import evaluate_perplexity, generate_completions


def _greedy(model, tok, text: str, n: int) -> str:
    ids = torch.tensor([tok(text)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_over_long_prompts_keep_their_end():
    tok, model = char_tokenizer(), build_tiny("llama")
    prompt = "123456789+" * 3 + "5="  # 32 characters = 32 tokens
    got = generate_completions(model, tok, [prompt, "1+2="], max_new_tokens=5, max_prompt_length=8, progress=False)
    assert got[0] == _greedy(model, tok, prompt[-8:], 5)
    assert _greedy(model, tok, prompt[:8], 5) != _greedy(model, tok, prompt[-8:], 5)  # the check can tell them apart
    assert tok.truncation_side == "right" and tok.padding_side == "right"  # restored


def test_conversational_perplexity_scores_the_rendered_assistant_turn():
    tok, model = char_tokenizer(), build_tiny("llama")
    msgs = messages_dataset(4, seed=1)
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in msgs["messages"]]
    prompts = [tok.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) for m in msgs["messages"]]
    assert all(r.startswith(p) for r, p in zip(rendered, prompts, strict=True))
    as_pc = Dataset.from_dict({"prompt": prompts, "completion": [r[len(p):] for r, p in zip(rendered, prompts,
                                                                                             strict=True)]})
    a = evaluate_perplexity(model, tok, msgs, progress=False)
    b = evaluate_perplexity(model, tok, as_pc, progress=False)
    # the template's end-of-turn <eos> is scored, as SFT trains on it; same tokens as the explicit pairs
    assert a["tokens_completion"] == b["tokens_completion"]
    assert a["perplexity_completion"] == pytest.approx(b["perplexity_completion"], rel=1e-6)


def test_calibration_split_refuses_ranks_without_samples():
    data = [{"input_ids": [1, 2, 3]} for _ in range(3)]
    with pytest.raises(ValueError, match="1 calibration example\\(s\\) for 2 processes"):
        sample_calibration_batches(data, n_samples=1, rank=1, world_size=2)
    assert len(sample_calibration_batches(data, n_samples=2, rank=1, world_size=2)) == 1
    for kw, match in ((dict(rank=1), "both rank and world_size"), (dict(rank=2, world_size=2), "0 <= rank"),
                      (dict(max_length=0), "max_length must be None or an int >= 1"),
                      (dict(n_samples="4"), "n_samples must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            sample_calibration_batches(data, **kw)
