"""Loading weights back into a trainer: resume, load_best_model_at_end, LoRA adapters, refusals.

transformers' own resume reads the file with `strict=False` and no key renaming, so GPT-NeoX's
`embed_out` (the saved name of `lm_head`) was silently dropped; these tests pin the RoSTE loader
that verifies digests, renames keys, loads strictly and checks the saved quantizer settings.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_data import char_tokenizer, prompt_completion_dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from hf_roste import RoSTEConfig, get_state
from hf_roste.export.checkpoint import CheckpointError
from hf_roste.training import RoSTESFTConfig, RoSTESFTTrainer
from hf_roste.training.lora import load_roste_adapter

IDS = torch.tensor([[5, 9, 12, 40, 33, 21, 7, 3]])


def _args(tmp_path, name="out", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3,
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, gradient_checkpointing=False,
                lr_scheduler_type="constant", rotation_calibration_samples=16, seed=0, max_length=32,
                dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    base.update(kw)
    return RoSTESFTConfig(**base)


def _trainer(path, args, config=None, **kw):
    return RoSTESFTTrainer(model=str(path), args=args, train_dataset=prompt_completion_dataset(32),
                           processing_class=char_tokenizer(), quantization_config=config or RoSTEConfig(), **kw)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture
def llama_run(tiny_checkpoints, tmp_path):
    """A 2-step llama run with a checkpoint at step 2 (master weights + roste_state.json)."""
    trainer = _trainer(tiny_checkpoints["llama"], _args(tmp_path, "run", max_steps=2, save_strategy="steps",
                                                        save_steps=2))
    trainer.train()
    return trainer, tmp_path / "run" / "checkpoint-2"


@pytest.mark.parametrize("kind", ["gpt_neox", "qwen3"])
def test_resume_restores_every_weight(tiny_checkpoints, tmp_path, kind):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = _trainer(tiny_checkpoints[kind], _args(tmp_path, "full", **kw))
    full.train()
    resumed = _trainer(tiny_checkpoints[kind], _args(tmp_path, "full", **kw))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a, b = _losses(full), _losses(resumed)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    ref, got = full.model.state_dict(), resumed.model.state_dict()
    for name, value in ref.items():  # lm_head included (saved as embed_out by GPT-NeoX)
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-6), name


def test_resume_refuses_corrupted_or_mismatched_checkpoints(tiny_checkpoints, tmp_path, llama_run):
    _, ckpt = llama_run
    path = tiny_checkpoints["llama"]
    # one flipped bit in the weights file
    flipped = tmp_path / "flipped"
    shutil.copytree(ckpt, flipped)
    weights = flipped / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded digest"):
        _trainer(path, _args(tmp_path, "a")).train(resume_from_checkpoint=str(flipped))
    # other quantizer settings than the checkpoint was trained with
    with pytest.raises(ValueError, match=r"weight_bits=4 in the checkpoint, 8 in the model"):
        _trainer(path, _args(tmp_path, "b"), RoSTEConfig(weight_bits=8)).train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=r"weight_group_size=None in the checkpoint, 16 in the model"):
        _trainer(path, _args(tmp_path, "c"), RoSTEConfig(weight_group_size=16)).train(resume_from_checkpoint=str(ckpt))
    # another architecture
    with pytest.raises(ValueError, match="does not match"):
        _trainer(tiny_checkpoints["gpt_neox"], _args(tmp_path, "d")).train(resume_from_checkpoint=str(ckpt))
    # a LoRA trainer on a full fine-tuning checkpoint
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="holds no LoRA adapter weights"):
        _trainer(path, _args(tmp_path, "e"), peft_config=lora).train(resume_from_checkpoint=str(ckpt))


@pytest.mark.parametrize("content,match", [
    ("{not json", "is not readable JSON"),
    ("{}", "is malformed: 'rotation_config'"),
    ('{"rotation_config": null}', "is malformed: 'rotation_config'"),
])
def test_resume_refuses_damaged_state_file(tiny_checkpoints, tmp_path, llama_run, content, match):
    _, ckpt = llama_run
    (ckpt / "roste_state.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        _trainer(tiny_checkpoints["llama"], _args(tmp_path, "x")).train(resume_from_checkpoint=str(ckpt))


def test_resume_refuses_missing_folder_and_packed_final_save(tiny_checkpoints, tmp_path, llama_run):
    trainer, _ = llama_run
    with pytest.raises(ValueError, match="does not exist"):
        _trainer(tiny_checkpoints["llama"], _args(tmp_path, "x")).train(resume_from_checkpoint=str(tmp_path / "nope"))
    trainer.save_model(str(tmp_path / "final"))
    with pytest.raises(ValueError, match="is a packed final save"):
        _trainer(tiny_checkpoints["llama"], _args(tmp_path, "y")).train(resume_from_checkpoint=str(tmp_path / "final"))
    # and a packed model cannot be fine-tuned at all
    with pytest.raises(ValueError, match="packed RoSTE checkpoint .* cannot be fine-tuned"):
        RoSTESFTTrainer(model=str(tmp_path / "final"), args=_args(tmp_path, "z"),
                        train_dataset=prompt_completion_dataset(8), processing_class=char_tokenizer())


def test_load_best_model_restores_its_rotation_configuration(tiny_checkpoints, tmp_path):
    # a re-search at every step and a high lr: checkpoints differ in rotations; the best is not the last
    args = _args(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                 rotation_search_interval=1, learning_rate=3e-2, per_device_train_batch_size=4)
    trainer = _trainer(tiny_checkpoints["llama"], args, eval_dataset=prompt_completion_dataset(8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = json.loads((tmp_path / "out" / best.rsplit("/", 1)[-1] / "roste_state.json").read_text())
    assert get_state(trainer.model).applied["layers"] == saved["rotation_config"]["layers"]
    ref = AutoModelForCausalLM.from_pretrained(best).eval()
    trainer.model.eval()
    with torch.no_grad():
        a, b = ref(IDS).logits, trainer.model(IDS).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-5)


def test_load_roste_adapter_applies_and_checks_the_saved_state(tiny_checkpoints, tmp_path):
    from peft import LoraConfig

    path = tiny_checkpoints["llama"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = _trainer(path, _args(tmp_path, learning_rate=2e-2), peft_config=lora)
    trainer.train()
    trained_layers = get_state(trainer.model).applied["layers"]
    assert any(any(layer.values()) for layer in trained_layers)  # the search switched something on
    trainer.save_model(str(tmp_path / "adapters"))
    # a fresh base: rotations not searched yet (all per-layer rotations off)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig())
    assert get_state(base).applied["layers"] != trained_layers
    model = load_roste_adapter(base, str(tmp_path / "adapters")).eval()
    assert get_state(model).applied["layers"] == trained_layers
    trainer.model.eval()
    with torch.no_grad():
        a, b = trainer.model(IDS).logits, model(IDS).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    other = AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(activation_bits=8))
    with pytest.raises(ValueError, match=r"activation_bits=4 in the checkpoint, 8 in the model"):
        load_roste_adapter(other, str(tmp_path / "adapters"))


def test_user_built_peft_model_is_refused(tiny_checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig())
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"plain PEFT LoRA layer around a RoSTE QATLinear.*peft_config"):
        RoSTESFTTrainer(model=model, args=_args(tmp_path), train_dataset=prompt_completion_dataset(8),
                        processing_class=char_tokenizer())


def test_plain_sft_config_is_upgraded_with_its_values(tiny_checkpoints, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=4, eos_token="<eos>", max_length=32, disable_tqdm=True)
    trainer = RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=args,
                              train_dataset=prompt_completion_dataset(8), processing_class=char_tokenizer(),
                              quantization_config=RoSTEConfig())
    assert isinstance(trainer.args, RoSTESFTConfig)
    assert trainer.args.eos_token == "<eos>" and trainer.args.max_length == 32 and trainer.args.max_steps == 1


def test_re_search_results_are_logged_at_their_step(tiny_checkpoints, tmp_path):
    trainer = _trainer(tiny_checkpoints["llama"], _args(tmp_path, max_steps=4, rotation_search_interval=2))
    trainer.train()
    steps = [h["step"] for h in trainer.state.log_history if "roste/search/layer_0/R2_error_on" in h]
    # searched before step 1 and after step 2 (not after the last step): each result logged with its step
    assert steps == [0, 2], steps
    assert trainer._pending_logs == {}
    with pytest.raises(ValueError, match="rotation_search='none' contradicts rotation_search_interval=2"):
        _args(tmp_path, rotation_search="none", rotation_search_interval=2)


def test_resume_accepts_equivalent_modules_to_not_convert(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    kw = dict(max_steps=3, save_strategy="steps", save_steps=2)
    skip = ["layers.0.mlp.down_proj", "lm_head"]
    _trainer(path, _args(tmp_path, "run", **kw), RoSTEConfig(modules_to_not_convert=skip)).train()
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    # the same exclusions written in another order are the same model
    _trainer(path, _args(tmp_path, "run", **kw), RoSTEConfig(modules_to_not_convert=skip[::-1])).train(
        resume_from_checkpoint=ckpt)
    with pytest.raises(ValueError, match="modules_to_not_convert="):
        _trainer(path, _args(tmp_path, "other", **kw), RoSTEConfig(modules_to_not_convert=["lm_head"])).train(
            resume_from_checkpoint=ckpt)


def test_saved_config_comparison_treats_default_exclusions_alike():
    from hf_roste.training.state import check_saved_quantization_config

    saved = {"quantization_config": RoSTEConfig().to_dict()}
    check_saved_quantization_config(saved, RoSTEConfig(modules_to_not_convert=["lm_head"]), "ckpt")
    check_saved_quantization_config(saved, RoSTEConfig(rotation_search="none"), "ckpt")  # how, not what
    with pytest.raises(ValueError, match=r"kv_bits=4 in the checkpoint, 8 in the model"):
        check_saved_quantization_config(saved, RoSTEConfig(kv_bits=8), "ckpt")


def test_extending_a_finished_run_with_re_search_equals_the_longer_run(tiny_checkpoints, tmp_path):
    # a run's last step has no re-search (nothing follows it); extending the run from that checkpoint
    # must do the re-search an uninterrupted longer run does after that step
    path = tiny_checkpoints["llama"]
    kw = dict(save_strategy="steps", save_steps=2, rotation_search_interval=2, learning_rate=2e-2)
    full = _trainer(path, _args(tmp_path, "full", max_steps=6, **kw))
    full.train()
    _trainer(path, _args(tmp_path, "short", max_steps=4, **kw)).train()
    longer = _trainer(path, _args(tmp_path, "short", max_steps=6, **kw))
    longer.train(resume_from_checkpoint=str(tmp_path / "short" / "checkpoint-4"))
    searched = [h["step"] for h in longer.state.log_history if "roste/search/layer_0/R2_error_on" in h]
    assert 4 in searched, searched
    a, b = _losses(full), _losses(longer)
    for step in (5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert get_state(longer.model).applied == get_state(full.model).applied
