"""User errors of `hf-roste sft / search / eval / demo / export` end in `hf-roste CMD: error: ...` and exit code 2
(never a raw traceback), with a message naming the flag and the fix; genuine bugs keep their traceback."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset, DatasetDict
from tiny_data import char_tokenizer, prompt_completion_dataset, save_tiny_with_tokenizer, write_jsonl
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_roste import RoSTEConfig
from hf_roste.cli import main
from hf_roste.commands._common import DEBUG_ENV, CommandError, run_guarded

SFT_FLAGS = ["--per_device_train_batch_size", "4", "--max_length", "32", "--report_to", "none", "--save_strategy",
             "no", "--use_cpu", "true", "--gradient_checkpointing", "false", "--disable_tqdm", "true",
             "--rotation_calibration_samples", "8", "--bf16", "false", "--max_steps", "1"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    model = save_tiny_with_tokenizer("llama", root / "model")
    save_tiny("llama", root / "model_notok")
    # intermediate_size 90 has no Hadamard construction (R4)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=90, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "i90")
    char_tokenizer().save_pretrained(root / "i90")
    packed = AutoModelForCausalLM.from_pretrained(model, quantization_config=RoSTEConfig(rotation_search="all"))
    packed.save_pretrained(root / "packed")  # the default save format of a RoSTE model
    char_tokenizer().save_pretrained(root / "packed")
    DatasetDict({"train": prompt_completion_dataset(8)}).save_to_disk(str(root / "dd_trainonly"))
    Dataset.from_dict({"prompt": [], "completion": []}).save_to_disk(str(root / "dd_empty"))
    (root / "header_only.csv").write_text("prompt,completion\n")
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n{not json\n')
    (root / "bad.yaml").write_text("model_name_or_path: [unclosed\n")
    (root / "rc_1layer.json").write_text('{"R1": true, "layers": [{"R2": true, "R3": true, "R4": true}]}')
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    (root / "adapter" / "roste_state.json").write_text("{}")
    return {
        "root": root,
        "model": str(model),
        "train": write_jsonl(root / "train.jsonl", prompt_completion_dataset(16)),
        "test": write_jsonl(root / "test.jsonl", prompt_completion_dataset(4, seed=1)),
        "cols": write_jsonl(root / "cols.jsonl", [{"question": "q", "answer": "a"}] * 4),
    }


def _sft(w, *extra, data=None, model=None, out="o"):
    return ["sft", "--model_name_or_path", model or w["model"], "--dataset_name", data or w["train"],
            "--output_dir", str(w["root"] / out), *SFT_FLAGS, *extra]


def _search(w, *extra, model=None):
    return ["search", model or w["model"], "--dataset", w["train"], "--samples", "4", *extra]


def _eval(w, *extra, model=None, data=None):
    return ["eval", model or w["model"], "--task", "perplexity", "--dataset", data or w["test"], "--no-progress",
            *extra]


# (case id, argv builder, words the message must contain)
CASES = [
    ("sft-missing-dataset", lambda w: _sft(w, data=str(w["root"] / "missing.jsonl")), ["--dataset_name", "does not exist"]),
    ("sft-missing-model", lambda w: _sft(w, model=str(w["root"] / "no_model")), ["--model_name_or_path", "does not exist"]),
    ("sft-wrong-columns", lambda w: _sft(w, data=w["cols"]), ["--dataset_name", "'prompt' + 'completion'"]),
    ("sft-group-size", lambda w: _sft(w, "--weight_group_size", "48"), ["weight_group_size=48", "divide"]),
    ("sft-rotation-config-layers", lambda w: _sft(w, "--rotation_config", str(w["root"] / "rc_1layer.json")),
     ["1 layer entries", "2 decoder layers"]),
    ("sft-eval-split", lambda w: _sft(w, "--eval_strategy", "steps", data=str(w["root"] / "dd_trainonly")),
     ["--dataset_test_split", "available: train", "--eval_strategy no"]),
    ("sft-empty-jsonl", lambda w: _sft(w, data=str(w["root"] / "empty.jsonl")), ["empty.jsonl", "empty"]),
    ("sft-broken-jsonl", lambda w: _sft(w, data=str(w["root"] / "broken.jsonl")), ["broken.jsonl", "JSON parse error"]),
    ("sft-bad-yaml", lambda w: ["sft", "--config", str(w["root"] / "bad.yaml")], ["--config", "not valid YAML"]),
    ("sft-output-dir-is-file", lambda w: ["sft", "--model_name_or_path", w["model"], "--dataset_name", w["train"],
                                          "--output_dir", w["train"], *SFT_FLAGS], ["--output_dir", "is a file"]),
    ("sft-resume-true-nothing", lambda w: _sft(w, "--resume_from_checkpoint", "true", out="fresh"),
     ["--resume_from_checkpoint true", "no complete checkpoint"]),
    ("sft-resume-missing-dir", lambda w: _sft(w, "--resume_from_checkpoint", str(w["root"] / "nope" / "checkpoint-3")),
     ["--resume_from_checkpoint", "not a folder"]),
    ("sft-lora-dropout", lambda w: _sft(w, "--use_peft", "true", "--lora_dropout", "0.1"), ["--lora_dropout 0"]),
    ("sft-lora-interval", lambda w: _sft(w, "--use_peft", "true", "--rotation_search_interval", "1"),
     ["rotation_search_interval"]),
    ("sft-search-none-interval", lambda w: _sft(w, "--rotation_search", "none", "--rotation_search_interval", "2"),
     ["rotation_search", "none"]),
    ("search-no-tokenizer", lambda w: _search(w, model=str(w["root"] / "model_notok")), ["no tokenizer files", "--tokenizer"]),
    ("search-missing-split", lambda w: ["search", w["model"], "--dataset", str(w["root"] / "dd_trainonly"), "--split",
                                        "validation"], ["--split validation", "available: train"]),
    ("search-hadamard", lambda w: _search(w, model=str(w["root"] / "i90")), ["Hadamard", "R4"]),
    ("search-packed", lambda w: _search(w, model=str(w["root"] / "packed")), ["packed RoSTE checkpoint", "master"]),
    ("search-rotation-config-dir", lambda w: _search(w, "--rotation-config", str(w["root"])), ["--rotation-config", "folder"]),
    ("search-hub-id-offline", lambda w: _search(w, model="no-such-org-xyz/no-such-model"), ["no-such-org-xyz/no-such-model"]),
    ("search-adapter-folder", lambda w: _search(w, model=str(w["root"] / "adapter")), ["LoRA adapters"]),
    ("eval-device-bogus", lambda w: _eval(w, "--device", "bogus"), ["--device 'bogus'", "cpu"]),
    ("eval-missing-split", lambda w: _eval(w, "--split", "validation", data=str(w["root"] / "dd_trainonly")),
     ["--split validation", "available: train"]),
    ("eval-no-tokenizer", lambda w: _eval(w, model=str(w["root"] / "model_notok")), ["tokenizer", "--tokenizer"]),
    ("eval-hadamard", lambda w: _eval(w, "--quantize", model=str(w["root"] / "i90")), ["Hadamard"]),
    ("eval-output-dir", lambda w: _eval(w, "--output", str(w["root"])), ["--output", "is a folder"]),
    ("eval-empty-file", lambda w: _eval(w, data=str(w["root"] / "empty.jsonl")), ["--dataset", "empty"]),
    ("eval-empty-csv", lambda w: _eval(w, data=str(w["root"] / "header_only.csv")), ["--dataset", "no examples"]),
    ("eval-empty-saved-dataset", lambda w: _eval(w, data=str(w["root"] / "dd_empty")), ["--dataset", "no examples"]),
    ("eval-adapter-damaged", lambda w: _eval(w, model=str(w["root"] / "adapter")), ["roste_state.json", "damaged"]),
    ("export-missing", lambda w: ["export", str(w["root"] / "missing"), str(w["root"] / "x")], ["does not exist"]),
]


@pytest.mark.parametrize("build,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_errors_exit_2_with_a_message(w, build, words, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = build(w)
    command = argv[0]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"hf-roste {command}: error:" in err and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_device_cuda_without_cuda(w, capsys):
    assert main(_eval(w, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err


def test_demo_bad_numbers_fail_before_any_side_effect(capsys):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="--threads must be >= 1") as exc:
        main(["demo", "--threads", "0"])
    assert exc.value.code == 2 and torch.get_num_threads() == threads
    assert "hf-roste demo: error: --threads must be >= 1, got 0" in capsys.readouterr().err


def test_debug_env_keeps_the_traceback(w, monkeypatch, capsys):
    assert main(_sft(w, "--weight_group_size", "48")) == 2
    assert f"{DEBUG_ENV}=1" in capsys.readouterr().err
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="weight_group_size=48"):
        main(_sft(w, "--weight_group_size", "48"))


def test_internal_bugs_are_not_swallowed(monkeypatch, capsys):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_guarded("eval", bug)

    def user_error():
        raise CommandError("--x is wrong: pass --y.")

    assert run_guarded("eval", user_error) == 2
    assert "hf-roste eval: error: --x is wrong: pass --y." in capsys.readouterr().err


def test_sft_quantize_false_warns_about_search_interval(w, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_roste.sft"):
        assert main(_sft(w, "--quantize", "false", "--rotation_search_interval", "1", out="fp_interval")) == 0
    assert any("rotation_search_interval=1 is ignored" in r.getMessage() for r in caplog.records)


def test_empty_split_is_a_user_error(monkeypatch):
    import hf_roste.data
    from hf_roste.commands._common import load_dataset_arg

    empty = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}).select([])
    monkeypatch.setattr(hf_roste.data, "load_any_dataset", lambda *a, **k: empty)
    with pytest.raises(CommandError, match="--dataset org/data: split 'test' has no examples"):
        load_dataset_arg("--dataset", "org/data", split="test")
