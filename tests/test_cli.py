"""`hf-roste sft / search / eval` end to end on a tiny model, a tiny tokenizer and local jsonl data (offline)."""

from __future__ import annotations

import json

import pytest
from tiny_data import (
    char_tokenizer,
    prompt_completion_dataset,
    save_tiny_with_tokenizer,
    text_dataset,
    write_jsonl,
)
from transformers import AutoModelForCausalLM

import hf_roste
from hf_roste.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "model": save_tiny_with_tokenizer("llama", root / "model"),
        "train": write_jsonl(root / "train.jsonl", prompt_completion_dataset(32)),
        "test": write_jsonl(root / "test.jsonl", prompt_completion_dataset(8, seed=1)),
        "text": write_jsonl(root / "text.jsonl", text_dataset(8)),
    }


@pytest.fixture(scope="module")
def trained(workdir):
    out = workdir["root"] / "sft-out"
    recipe = workdir["root"] / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {workdir['model']}\n"
        f"dataset_name: {workdir['train']}\n"
        "max_steps: 2\nper_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nmax_length: 32\n"
        "report_to: none\nsave_strategy: 'no'\nuse_cpu: true\ngradient_checkpointing: false\n"
        "rotation_calibration_samples: 8\nlogging_steps: 1\ndisable_tqdm: true\n"
        "weight_bits: 4\nactivation_bits: 4\nkv_bits: 4\nrotations: [R1, R2, R3, R4]\nrotation_search: adaptive\n"
    )
    # the command line overrides the YAML (kv_bits, output_dir)
    rc = main(["sft", "--config", str(recipe), "--output_dir", str(out), "--kv_bits", "8"])
    assert rc == 0
    return out


def test_sft_writes_a_loadable_roste_checkpoint(trained):
    cfg = json.loads((trained / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "roste" and cfg["kv_bits"] == 8 and cfg["rotation_config"] is not None
    model = AutoModelForCausalLM.from_pretrained(trained)
    state = hf_roste.get_state(model)
    assert state.searched and state.config.kv_bits == 8
    assert (trained / "tokenizer_config.json").exists()


def test_sft_full_precision_baseline(workdir, tmp_path):
    out = tmp_path / "fp"
    rc = main(["sft", "--model_name_or_path", workdir["model"], "--dataset_name", workdir["train"], "--output_dir",
               str(out), "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "32",
               "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--gradient_checkpointing",
               "false", "--quantize", "false", "--disable_tqdm", "true"])
    assert rc == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_search_prints_table_and_writes_outputs(workdir, tmp_path, capsys):
    rc_file, out = tmp_path / "rc.json", tmp_path / "searched"
    rc = main(["search", workdir["model"], "--dataset", workdir["train"], "--samples", "8", "--batch-size", "4",
               "--rotation-config", str(rc_file), "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| layer |" in printed and "R4" in printed
    saved = json.loads(rc_file.read_text())
    assert len(saved["layers"]) == 2 and saved["R1"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert hf_roste.get_state(model).applied["layers"] == saved["layers"]
    # the written configuration is accepted by `hf-roste sft --rotation_config`
    from hf_roste.commands.sft import parse_args

    _, _, _, roste = parse_args(["--rotation_config", str(rc_file), "--use_cpu", "true"])
    assert roste.to_roste_config().rotation_config["layers"] == saved["layers"]


@pytest.mark.parametrize("task,key", [("rouge", "rouge_avg"), ("exact-match", "exact_match"),
                                      ("perplexity", "perplexity_completion")])
def test_eval_on_roste_checkpoint(trained, workdir, tmp_path, capsys, task, key):
    out = tmp_path / "scores.json"
    rc = main(["eval", str(trained), "--task", task, "--dataset", workdir["test"], "--max-new-tokens", "4",
               "--batch-size", "4", "--output", str(out), "--no-progress"])
    assert rc == 0
    assert key in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model_kind"] == "RoSTE w4a4kv8" and report["results"]["samples"] == 8
    value = report["results"][key]
    assert value >= 0 and (task == "perplexity" or value <= 100)
    if task != "perplexity":
        assert len(report["results"]["predictions"]) == 8


def test_eval_full_precision_and_quantized(workdir, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["eval", workdir["model"], "--task", "perplexity", "--dataset", workdir["text"], "--output", str(out),
                 "--no-progress"]) == 0
    fp = json.loads(out.read_text())
    assert fp["model_kind"] == "full precision" and "perplexity_completion" not in fp["results"]
    assert main(["eval", workdir["model"], "--task", "perplexity", "--dataset", workdir["text"], "--output", str(out),
                 "--quantize", "--rotations", "none", "--no-progress"]) == 0
    rtn = json.loads(out.read_text())
    assert rtn["model_kind"] == "RoSTE w4a4kv4"
    assert rtn["results"]["perplexity_full"] != fp["results"]["perplexity_full"]


def test_evaluation_api_matches_between_calls(workdir):
    from datasets import load_dataset

    from hf_roste.evaluation import evaluate_exact_match, evaluate_perplexity

    model = AutoModelForCausalLM.from_pretrained(workdir["model"])
    tok = char_tokenizer()
    data = load_dataset("json", data_files=workdir["test"], split="train")
    a = evaluate_perplexity(model, tok, data, batch_size=3, progress=False)
    b = evaluate_perplexity(model, tok, data, batch_size=8, progress=False)  # padding must not change the score
    assert a["perplexity_completion"] == pytest.approx(b["perplexity_completion"], rel=1e-4)
    em1 = evaluate_exact_match(model, tok, data, max_new_tokens=3, batch_size=3, progress=False,
                               return_predictions=True)
    em8 = evaluate_exact_match(model, tok, data, max_new_tokens=3, batch_size=8, progress=False,
                               return_predictions=True)
    assert em1["predictions"] == em8["predictions"]  # left padding: batching does not change greedy outputs


def test_rouge_without_package_names_the_extra(monkeypatch):
    import builtins

    from hf_roste import evaluation

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("rouge_score"):
            raise ImportError("No module named 'rouge_score'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install hf-roste\[eval\]"):
        evaluation.rouge_scores(["a"], ["a"])


@pytest.mark.parametrize("command", ["sft", "search", "eval", "demo"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0 if command == "sft" else _exits(lambda: main([command, "--help"])) == 0
    text = capsys.readouterr().out
    assert f"hf-roste {command}" in text
    if command == "sft":
        assert "--weight_bits" in text and "--rotation_search" in text and "--model_name_or_path" in text
    if command == "eval":
        assert "--task" in text and "exact-match" in text


def _exits(fn) -> int:
    with pytest.raises(SystemExit) as exc:
        fn()
    return int(exc.value.code or 0)


def test_bad_arguments(workdir, tmp_path, capsys):
    # sft: unknown recipe file, invalid field value, unknown field
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["sft", "--model_name_or_path", workdir["model"], "--weight_clip_ratio", "1.5",
                 "--use_cpu", "true"]) == 2
    assert "weight_clip_ratio" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nuse_cpu: true\nweight_bitz: 4\n")
    assert main(["sft", "--config", str(bad)]) == 2
    assert "weight_bitz" in capsys.readouterr().err
    assert main(["sft", "--weight_bits", "5", "--use_cpu", "true"]) == 2
    assert "weight_bits" in capsys.readouterr().err
    assert main(["sft", "--output_dir", str(tmp_path / "o")]) == 2  # bf16 default on a CPU-only machine
    assert "--use_cpu true" in capsys.readouterr().err
    assert main(["sft", "--use_cpu", "true", "--output_dir", str(tmp_path / "o")]) == 2
    assert "model_name_or_path is required" in capsys.readouterr().err
    # eval / search
    assert _exits(lambda: main(["eval", workdir["model"], "--task", "bleu", "--dataset", workdir["test"]])) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["eval", workdir["model"], "--task", "perplexity", "--dataset", str(tmp_path / "nope.jsonl")]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["eval", workdir["model"], "--task", "perplexity", "--dataset", workdir["test"],
                 "--rotations", "R1"]) == 2
    assert "--quantize" in capsys.readouterr().err
    assert _exits(lambda: main(["search", workdir["model"], "--dataset", workdir["train"], "--samples", "0"])) == 2
    assert "--samples" in capsys.readouterr().err
    bad_data = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["search", workdir["model"], "--dataset", bad_data]) == 2
    assert "prompt" in capsys.readouterr().err


SFT_FLAGS = ["--per_device_train_batch_size", "4", "--max_length", "32", "--report_to", "none", "--use_cpu", "true",
             "--gradient_checkpointing", "false", "--disable_tqdm", "true", "--rotation_calibration_samples", "8",
             "--bf16", "false"]


def test_text_columns_read_as_numbers_become_strings(tmp_path):
    from hf_roste.data import load_any_dataset

    csv = tmp_path / "sums.csv"
    csv.write_text("prompt,completion\n24+48=,72\n1+6=,007\n1.5+2=,3.50\n")
    data = load_any_dataset(str(csv))
    assert data["completion"] == ["72", "007", "3.50"]  # as written, not 72 / 7.0 / 3.5
    data = load_any_dataset(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "2+2=", "completion": 4}, {"prompt": 5, "completion": 6}]))
    assert data["prompt"] == ["2+2=", "5"] and data["completion"] == ["4", "6"]
    data = load_any_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": 12}]))
    assert data["text"] == ["12"]


def test_sft_on_csv_with_numeric_completions(workdir, tmp_path):
    csv = tmp_path / "train.csv"
    prompt_completion_dataset(16).to_csv(str(csv))  # `24+48=,72`: the completion column reads as int64
    assert csv.read_text().splitlines()[1].split(",")[1].isdigit()  # bare numbers: read as int64
    assert main(["sft", "--model_name_or_path", workdir["model"], "--dataset_name", str(csv), "--output_dir",
                 str(tmp_path / "o"), "--max_steps", "1", "--save_strategy", "no", *SFT_FLAGS]) == 0


def test_sft_resume_from_checkpoint_true_and_false(workdir, tmp_path):
    out = tmp_path / "o"
    base = ["sft", "--model_name_or_path", workdir["model"], "--dataset_name", workdir["train"], "--output_dir",
            str(out), "--save_strategy", "steps", "--save_steps", "2", *SFT_FLAGS]
    assert main([*base, "--max_steps", "2"]) == 0
    assert (out / "checkpoint-2" / "roste_state.json").exists()
    # `true` resumes from the newest complete checkpoint of output_dir (not from a folder named "true")
    assert main([*base, "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and not [h for h in state["log_history"] if h.get("step") in (1, 2) and "loss" in h]
    # `false` starts over
    assert main([*base, "--max_steps", "1", "--save_strategy", "no", "--resume_from_checkpoint", "false",
                 "--output_dir", str(tmp_path / "fresh")]) == 0


def test_eval_on_roste_lora_adapter_folder_scores_the_trained_model(workdir, tmp_path):
    """`hf-roste eval` on the folder of `hf-roste sft --use_peft true` rebuilds the RoSTE base (saved quantization and
    rotations) with the adapters inside the quantizers: the score is the trained model's, not FP base + plain LoRA."""
    from datasets import load_dataset

    from hf_roste.commands.sft import parse_args, run_sft
    from hf_roste.evaluation import evaluate_perplexity

    out = tmp_path / "lora"
    # plain `--use_peft true`: lora_dropout defaults to 0 for RoSTE (TRL's 0.05 has no exact quantized merge)
    args = parse_args(["--model_name_or_path", workdir["model"], "--dataset_name", workdir["train"], "--output_dir",
                       str(out), "--max_steps", "3", "--learning_rate", "1e-2", "--save_strategy", "no",
                       "--use_peft", "true", "--lora_target_modules", "all-linear", *SFT_FLAGS])
    assert args[2].lora_dropout == 0
    trainer = run_sft(*args)
    trained = trainer.model.eval()
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    assert (out / "adapter_config.json").exists() and (out / "roste_state.json").exists()
    data = load_dataset("json", data_files=workdir["test"], split="train")
    expected = evaluate_perplexity(trained, trainer.processing_class, data, progress=False)

    scores = tmp_path / "scores.json"
    assert main(["eval", str(out), "--task", "perplexity", "--dataset", workdir["test"], "--output", str(scores),
                 "--no-progress"]) == 0
    report = json.loads(scores.read_text())
    for key in ("perplexity_completion", "perplexity_full"):
        assert report["results"][key] == pytest.approx(expected[key], rel=1e-5), key
    assert report["model_kind"] == "RoSTE w4a4kv4 + LoRA"
    # the rotation search cannot run on adapters (it would rotate the base under them)
    assert main(["search", str(out), "--dataset", workdir["train"], "--samples", "4"]) == 2


def test_sft_with_a_rotation_config_file_keeps_it(workdir, tmp_path):
    # every roste recipe says rotation_search: adaptive; a given file must still fix the rotations
    layers = [{"R2": True, "R3": True, "R4": True}, {"R2": False, "R3": True, "R4": False}]
    rc_file = tmp_path / "rc.json"
    rc_file.write_text(json.dumps({"R1": True, "layers": layers}))
    out = tmp_path / "fixed"
    rc = main(["sft", "--model_name_or_path", workdir["model"], "--dataset_name", workdir["train"], "--output_dir",
               str(out), "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "32",
               "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--gradient_checkpointing",
               "false", "--disable_tqdm", "true", "--rotation_search", "adaptive", "--rotation_config", str(rc_file)])
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert hf_roste.get_state(model).applied["layers"] == layers
