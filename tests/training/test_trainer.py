"""RoSTESFTTrainer end to end on tiny models: search, loss, formats, resume, LoRA, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_data import char_tokenizer, messages_dataset, prompt_completion_dataset, text_dataset
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state
from hf_roste.training import RoSTESFTConfig, RoSTESFTTrainer


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=8, learning_rate=5e-3,
                logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, gradient_checkpointing=False,
                lr_scheduler_type="constant", rotation_calibration_samples=16, seed=0, max_length=32,
                dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    base.update(kw)
    return RoSTESFTConfig(**base)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_prompt_completion_end_to_end(tiny_checkpoints, tmp_path, kind):
    trainer = RoSTESFTTrainer(
        model=str(tiny_checkpoints[kind]), args=_args(tmp_path), train_dataset=prompt_completion_dataset(),
        processing_class=char_tokenizer(), quantization_config=RoSTEConfig(),
    )
    trainer.train()
    state = get_state(trainer.model)
    assert trainer.last_search_result is not None and state.searched
    rc = trainer.model.config.quantization_config.rotation_config
    assert rc is not None and len(rc["layers"]) == 2 and "errors" in rc
    history = trainer.state.log_history
    search_logs = [h for h in history if any(k.startswith("roste/search/") for k in h)]
    assert search_logs and history.index(search_logs[0]) < min(i for i, h in enumerate(history) if "loss" in h)
    losses = list(_losses(trainer).values())
    assert losses[-1] < losses[0], losses
    qerr = [h for h in history if "roste/input_qerr/mean" in h]
    assert qerr and all(0 < h["roste/input_qerr/mean"] < 1 for h in qerr)
    assert any("roste/input_qerr/layer_1" in h and "roste/weight_qerr/layer_0" in h for h in history)
    # the final save packs; it reloads as the same model
    final = tmp_path / "final"
    trainer.save_model(str(final))
    saved = json.loads((final / "config.json").read_text())["quantization_config"]
    assert saved["checkpoint_format"] == "packed" and saved["rotation_config"]["layers"] == rc["layers"]
    assert (final / "roste_state.json").exists()
    packed = AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    assert get_state(packed).packed
    trainer.model.eval()
    ids = torch.tensor([[5, 9, 12, 40, 33, 21, 7]])
    with torch.no_grad():
        a, b = trainer.model(ids).logits, packed(ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


@pytest.mark.parametrize("dataset_fn,extra", [(messages_dataset, {"assistant_only_loss": True}), (text_dataset, {})])
def test_other_dataset_formats(tiny_checkpoints, tmp_path, dataset_fn, extra):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig())
    trainer = RoSTESFTTrainer(model=model, args=_args(tmp_path, max_steps=4, **extra), train_dataset=dataset_fn(),
                              processing_class=char_tokenizer())
    trainer.train()
    assert get_state(trainer.model).searched
    losses = list(_losses(trainer).values())
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_resume_equals_uninterrupted_run(tiny_checkpoints, tmp_path):
    kw = dict(max_steps=6, logging_steps=1, save_strategy="steps", save_steps=3)
    path = str(tiny_checkpoints["llama"])
    full = RoSTESFTTrainer(model=path, args=_args(tmp_path, **kw), train_dataset=prompt_completion_dataset(),
                           processing_class=char_tokenizer(), quantization_config=RoSTEConfig())
    full.train()
    reference = _losses(full)
    ckpt = tmp_path / "out" / "checkpoint-3"
    saved = json.loads((ckpt / "roste_state.json").read_text())
    assert saved["rotation_config"]["layers"] == get_state(full.model).applied["layers"]
    assert (ckpt / "model.safetensors").exists() and not list(ckpt.glob("pytorch_model*.bin"))
    # a different calibration seed: a fresh search could choose differently; resume must not search
    resumed = RoSTESFTTrainer(model=path, args=_args(tmp_path, rotation_search_seed=123, **kw),
                              train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
                              quantization_config=RoSTEConfig())
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.last_search_result is None
    assert get_state(resumed.model).applied["layers"] == saved["rotation_config"]["layers"]
    again = _losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, again, reference)


def test_lora_training_merges_exactly(tiny_checkpoints, tmp_path):
    from peft import LoraConfig

    from hf_roste.training import load_roste_adapter

    path = str(tiny_checkpoints["llama"])
    qc = RoSTEConfig(rotation_search="all")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = RoSTESFTTrainer(model=path, args=_args(tmp_path, max_steps=6, learning_rate=2e-2),
                              train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
                              quantization_config=qc, peft_config=lora)
    trainer.train()
    peft_model = trainer.model.eval()
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    ids = char_tokenizer()(["12+30=", "7+7="], padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = peft_model(**ids).logits
    trained_gen = peft_model.generate(**ids, max_new_tokens=6, do_sample=False)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        after = merged(**ids).logits
    assert (after - trained).abs().max() <= 1e-5 * trained.abs().max()
    assert torch.equal(merged.generate(**ids, max_new_tokens=6, do_sample=False), trained_gen)
    # the documented call to load adapters back onto a RoSTE base with the same configuration
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(rotation_search="all")).eval()
    reloaded = load_roste_adapter(base, str(adapter_dir))
    with torch.no_grad():
        assert (reloaded(**ids).logits - trained).abs().max() <= 1e-5 * trained.abs().max()


def test_lora_dropout_is_refused(tiny_checkpoints, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="lora_dropout=0.1 is not supported with RoSTE"):
        RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=_args(tmp_path),
                        train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
                        quantization_config=RoSTEConfig(), peft_config=LoraConfig(r=2, lora_dropout=0.1))


def test_bad_input(tiny_checkpoints, tmp_path):
    from datasets import Dataset

    tok = char_tokenizer()
    with pytest.raises(ValueError, match=r"columns \['question'\].*'prompt' \+ 'completion'"):
        RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=_args(tmp_path),
                        train_dataset=Dataset.from_dict({"question": ["a"]}), processing_class=tok,
                        quantization_config=RoSTEConfig())
    with pytest.raises(ValueError, match="is not a RoSTE checkpoint: pass quantization_config"):
        RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=_args(tmp_path),
                        train_dataset=prompt_completion_dataset(), processing_class=tok)
    with pytest.raises(ValueError, match="was not prepared for RoSTE"):
        RoSTESFTTrainer(model=build_tiny("llama"), args=_args(tmp_path), train_dataset=prompt_completion_dataset(),
                        processing_class=tok)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"rotation_search_interval={bad} is invalid"):
            _args(tmp_path, rotation_search_interval=bad)
    with pytest.raises(ValueError, match="rotation_calibration_samples=0"):
        _args(tmp_path, rotation_calibration_samples=0)
    with pytest.raises(ValueError, match="rotation_search='greedy'"):
        _args(tmp_path, rotation_search="greedy")


def test_periodic_re_search_keeps_function_and_optimizer_coherent(tiny_checkpoints, tmp_path, monkeypatch):
    import hf_roste.training.trainer as trainer_mod
    from hf_roste import set_quantization_enabled

    calls = []
    real = trainer_mod.search_rotation_config

    def spy(model, batches, strategy="adaptive", criterion="paper", **kw):
        set_quantization_enabled(model, False)
        ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
        with torch.no_grad():
            before = model(ids).logits
        result = real(model, batches, strategy=strategy, criterion=criterion, **kw)
        with torch.no_grad():
            after = model(ids).logits
        set_quantization_enabled(model, True)
        calls.append((kw.get("optimizer") is not None, float((after - before).abs().max() / before.abs().max())))
        return result

    monkeypatch.setattr(trainer_mod, "search_rotation_config", spy)
    trainer = RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=_args(tmp_path, max_steps=6,
                              rotation_search_interval=2, logging_steps=1), train_dataset=prompt_completion_dataset(),
                              processing_class=char_tokenizer(), quantization_config=RoSTEConfig())
    trainer.train()
    # once before training (no optimizer yet), then after steps 2 and 4 with the optimizer's moments
    assert [c[0] for c in calls] == [False, True, True]
    assert all(err <= 1e-4 for _, err in calls), calls
    losses = list(_losses(trainer).values())
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_rotation_search_through_lora_wrappers_preserves_function(tiny_checkpoints, kind):
    """The search on a PEFT model looks through the LoRA wrappers: it measures R2/R4 and fuses them exactly."""
    from peft import LoraConfig, get_peft_model

    from hf_roste import search_rotation_config, set_quantization_enabled
    from hf_roste.modules.qat_linear import QATLinear
    from hf_roste.training.lora import register_roste_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[kind], quantization_config=RoSTEConfig(),
                                                 dtype=torch.float32, attn_implementation="eager")
    lora = register_roste_lora(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
    peft_model = get_peft_model(model, lora).eval()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=g), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
               for _ in range(2)]
    ids = batches[0]["input_ids"]
    set_quantization_enabled(peft_model, False)
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    set_quantization_enabled(peft_model, True)
    result = search_rotation_config(peft_model, batches)
    rows = result.table()
    assert all(r.get("R4_error") is not None and r.get("R2_error") is not None for r in rows), rows
    assert all(r["R4_error"][0] > 0 and r["R2_error"][0] > 0 for r in rows)
    applied = get_state(peft_model).applied
    base = peft_model.get_base_model()
    for i, flags in enumerate(applied["layers"]):  # R4 is switched on the QATLinear the LoRA layer computes with
        down = base.model.layers[i].mlp.down_proj.get_base_layer()
        assert isinstance(down, QATLinear) and down.input_hadamard == flags["R4"]
    assert any(f["R4"] or f["R2"] for f in applied["layers"]), applied  # something was fused
    set_quantization_enabled(peft_model, False)
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_lora_with_default_adaptive_search_trains_and_refuses_re_search(tiny_checkpoints, tmp_path):
    from peft import LoraConfig

    from hf_roste import search_rotation_config

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=_args(tmp_path, max_steps=4),
                              train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
                              quantization_config=RoSTEConfig(), peft_config=lora)
    trainer.train()
    assert trainer.last_search_result is not None and get_state(trainer.model).searched
    assert all(r.get("R4_error") is not None for r in trainer.last_search_result.table())
    # the adapters are trained now: a new search would rotate the base weights under them
    with pytest.raises(ValueError, match=r"LoRA adapters are trained.*merge_and_unload"):
        search_rotation_config(trainer.model, trainer.calibration_batches())
    with pytest.raises(ValueError, match=r"rotation_search_interval is not supported with peft_config"):
        RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=_args(tmp_path, rotation_search_interval=2),
                        train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
                        quantization_config=RoSTEConfig(), peft_config=lora)


def test_rotation_search_has_one_vocabulary(tiny_checkpoints, tmp_path):
    """`rotation_search` takes the same values in RoSTEConfig and RoSTESFTConfig, with the same meaning."""
    from hf_roste.config import SEARCH_STRATEGIES

    for value in SEARCH_STRATEGIES:
        assert RoSTEConfig(rotation_search=value).rotation_search == value
        assert _args(tmp_path, rotation_search=value).rotation_search == value
    # 'all' in the trainer: every allowed per-layer rotation on, no search (as RoSTEConfig(rotation_search='all'))
    trainer = RoSTESFTTrainer(
        model=str(tiny_checkpoints["llama"]), args=_args(tmp_path, rotation_search="all"),
        train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
        quantization_config=RoSTEConfig(rotations=("R1", "R2", "R4")),
    )
    assert trainer._wants_search() is None
    assert get_state(trainer.model).applied["layers"] == [{"R2": True, "R3": False, "R4": True}] * 2
    # the trainer's default follows the model's RoSTEConfig, 'layerwise' included
    trainer = RoSTESFTTrainer(
        model=str(tiny_checkpoints["llama"]), args=_args(tmp_path),
        train_dataset=prompt_completion_dataset(), processing_class=char_tokenizer(),
        quantization_config=RoSTEConfig(rotation_search="layerwise"),
    )
    assert trainer._wants_search() == "layerwise"
    assert get_state(trainer.model).applied["layers"] == [{"R2": False, "R3": False, "R4": False}] * 2
    with pytest.raises(ValueError, match="'all' never searches"):
        _args(tmp_path, rotation_search="all", rotation_search_interval=2)
