"""The authors' setup, as the `paper` recipes use it: whole-sequence legacy chat format, calibration on the
first prompts, and the `roste-paper` evaluation protocol (tiny models, no download)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_data import char_tokenizer, prompt_completion_dataset
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.cli import main
from hf_roste.eval_protocols import (
    ROSTE_PAPER,
    evaluate_protocol,
    extract_summary,
    generate_paper_predictions,
)
from hf_roste.training import RoSTESFTConfig, RoSTESFTTrainer
from hf_roste.training.paper_format import legacy_text_dataset, render_legacy


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                report_to="none", save_strategy="no", use_cpu=True, activation_checkpointing=False,
                rotation_calibration_samples=6, seed=0, max_length=64, dataloader_num_workers=0, disable_tqdm=True,
                bf16=False, log_quantization_error=False, logging_steps=1)
    base.update(kw)
    return RoSTESFTConfig(**base)


def test_legacy_formats_render_the_transformers_4_40_defaults():
    assert render_legacy("P", "C", "chatml", "<eos>") == "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\nC<|im_end|>\n"
    assert render_legacy("P", "C", "eos_concat", "<eos>") == "P<eos>C<eos>"
    with pytest.raises(ValueError, match="expected one of"):
        render_legacy("P", "C", "alpaca", "<eos>")


def test_first_prompts_calibration_and_whole_sequence_training(tiny_checkpoints, tmp_path):
    tok = char_tokenizer()
    raw = prompt_completion_dataset(32)
    ds = legacy_text_dataset(raw, tok, "eos_concat", max_length=64)
    eos = tok.eos_token_id
    for i in range(3):  # prompt, eos, completion, eos: every token is a training target
        p, c = raw[i]["prompt"], raw[i]["completion"]
        assert ds[i]["input_ids"] == tok(p)["input_ids"] + [eos] + tok(c)["input_ids"] + [eos]
        assert ds[i]["prompt"] == p
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig())
    args = _args(tmp_path, completion_only_loss=False, rotation_calibration_source="first_prompts",
                 rotation_calibration_max_length=8)
    trainer = RoSTESFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    # TRL keeps our token ids as they are (no extra eos, no re-tokenization)
    assert trainer.train_dataset[0]["input_ids"] == ds[0]["input_ids"]
    batches = trainer.calibration_batches()
    rows = [(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert rows == [tok(raw[i]["prompt"])["input_ids"][:8] for i in range(6)]  # the first 6 prompts, start kept
    assert all(b["attention_mask"][:, -1].all() for b in batches)  # left padding
    trainer.train()
    assert trainer.last_search_result is not None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_calibration_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="rotation_calibration_source='everything' is invalid"):
        _args(tmp_path, rotation_calibration_source="everything")
    with pytest.raises(ValueError, match="rotation_calibration_max_length=0 is invalid"):
        _args(tmp_path, rotation_calibration_max_length=0)


def test_first_prompts_needs_a_prompt_column(tiny_checkpoints, tmp_path):
    from tiny_data import text_dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig())
    with pytest.raises(ValueError, match="reads the 'prompt' column"):
        RoSTESFTTrainer(model=model, args=_args(tmp_path, rotation_calibration_source="first_prompts"),
                        train_dataset=text_dataset(), processing_class=char_tokenizer())


def test_extract_summary_cuts_after_the_first_marker():
    assert extract_summary("POST: x\nTL;DR: a summary TL;DR: b", "TL;DR:") == "a summary TL;DR: b"
    assert extract_summary("  truncated prompt and text ", "TL;DR:") == "truncated prompt and text"


def test_paper_protocol_pads_to_the_prompt_length_and_decodes_the_whole_sequence(tiny_checkpoints):
    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    proto = dataclasses.replace(ROSTE_PAPER, max_samples=3, prompt_length=24, max_new_tokens=5)
    prompts = ["abc TL;DR:", "a much longer prompt that is cut TL;DR:", "xyz TL;DR:"]
    seen = []
    original = model.generate

    def spy(**kw):
        seen.append((kw["input_ids"].clone(), kw["attention_mask"].clone()))
        return original(**kw)

    model.generate = spy
    preds = generate_paper_predictions(model, tok, prompts, proto, batch_size=2, progress=False)
    ids = torch.cat([s[0] for s in seen])
    mask = torch.cat([s[1] for s in seen])
    assert ids.shape == (3, 24) and (mask.sum(1) == torch.tensor([10, 24, 10])).all()
    assert (ids[0, :14] == tok.eos_token_id).all()  # left padding with eos
    assert ids[1][mask[1].bool()].tolist() == tok(prompts[1])["input_ids"][:24]  # truncation keeps the start
    out = original(input_ids=seen[0][0], attention_mask=seen[0][1], max_new_tokens=5, do_sample=False,
                   pad_token_id=tok.eos_token_id)
    whole = tok.decode(out[0], skip_special_tokens=True)
    assert preds[0] == extract_summary(whole, "TL;DR:")
    # the second prompt lost its marker to truncation: the prediction is the whole decoded text
    kept = tok.decode(ids[1][mask[1].bool()], skip_special_tokens=True).strip()
    assert "TL;DR:" not in kept and preds[1].startswith(kept)


def test_paper_protocol_scores_with_the_evaluate_defaults(tiny_checkpoints):
    pytest.importorskip("rouge_score")
    from datasets import Dataset

    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    ds = Dataset.from_dict({"prompt": ["one TL;DR:", "two TL;DR:", "three TL;DR:", "unused"],
                            "completion": [" running dogs", " ran", " runs fast", " x"]})
    proto = dataclasses.replace(ROSTE_PAPER, max_samples=3, prompt_length=16, max_new_tokens=4)
    out = evaluate_protocol(proto, model, tok, ds, batch_size=2, progress=False, return_predictions=True)
    assert out["samples"] == 3 and len(out["predictions"]) == 3
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    per = [scorer.score(r, p) for r, p in zip(ds["completion"][:3], out["predictions"], strict=True)]
    mean_r1 = 100 * sum(s["rouge1"].fmeasure for s in per) / 3
    assert out["mean_over_items"]["rouge1"] == pytest.approx(mean_r1)
    assert 0.0 <= out["rouge_avg"] <= 100.0 and out["protocol"]["use_stemmer"] is False
    with pytest.raises(ValueError, match="has only 4"):
        evaluate_protocol(dataclasses.replace(proto, max_samples=5), model, tok, ds, progress=False)


def test_protocol_flag_refuses_settings_it_fixes(capsys):
    assert main(["eval", "some/model", "--protocol", "roste-paper", "--task", "perplexity"]) != 0
    assert "--protocol roste-paper fixes these settings; drop --task perplexity" in capsys.readouterr().err
    assert main(["eval", "some/model", "--protocol", "roste-paper", "--max-length", "100"]) != 0
    assert "--max-length" in capsys.readouterr().err
    assert main(["eval", "some/model"]) != 0
    assert "--task and --dataset required" in capsys.readouterr().err
