"""`hf-roste demo`: the quick run completes and reports measured rows; the shipped base is pre-trained."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_roste.cli import main
from hf_roste.demo import shipped_base_path
from hf_roste.demo.pretrain import answer_loss, base_config
from hf_roste.demo.tasks import PRETRAIN_TASKS, encode, held_out_split, pretrain_example


def test_quick_demo_writes_measured_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file()
    rows = result["rows"]
    expected = [("FP", "fp_sft")] + [("W4A4KV4", m) for m in ("sft_rtn", "sft_rot_rtn", "ste", "roste")]
    assert [(r["scheme"], r["method"]) for r in rows] == expected
    for r in rows:
        assert r["label"] in printed  # the printed table has one line per measured row
        assert math.isfinite(r["completion_loss"]) and r["completion_loss"] > 0
        assert 0.0 <= r["exact_match"] <= 1.0
        assert r["checkpoint_bytes"] > 0
        assert r["seeds"] == 2 and len(r["completion_loss_per_seed"]) == 2
        if r["method"] != "fp_sft":
            d = r["vs_fp_sft"]["completion_loss"]
            assert d["verdict"] in ("within noise", "beyond noise") and math.isfinite(d["mean"])
    assert f"{rows[0]['completion_loss']:.4f}" in printed
    losses = [r["completion_loss"] for r in rows]
    assert len(set(losses)) == len(losses), losses  # every method measured on its own
    by = {r["method"]: r for r in rows}
    assert by["roste"]["checkpoint_bytes"] < by["fp_sft"]["checkpoint_bytes"]
    assert by["ste"]["train_seconds"] > 0 and by["sft_rtn"]["train_seconds"] == 0
    assert len(result["runs"]) == 2 * 5
    checks = result["reload_checks"]
    assert checks and all(c["all_identical"] for c in checks), checks
    assert "wall time" in printed and result["wall_seconds"] > 0


def test_shipped_base_is_pretrained():
    path = shipped_base_path()
    assert (path / "model.safetensors").stat().st_size < 12_000_000
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    scratch = AutoModelForCausalLM.from_config(base_config(), dtype=torch.float32)
    trained, untrained = answer_loss(base, n=48, seed=7), answer_loss(scratch, n=48, seed=7)
    assert trained < 0.5 * untrained, (trained, untrained)
    shipped_tok = PreTrainedTokenizerFast.from_pretrained(path)
    assert shipped_tok("rev(abc)=cba")["input_ids"] == encode("rev(abc)=cba")
    # the skill the demo's held-out format relies on (`len`) is learned: greedy answers are right
    rng, right = random.Random(3), 0
    for task in ["len"] * 6:
        if task in PRETRAIN_TASKS:
            p, a = pretrain_example(rng, task)
            ids = torch.tensor([encode(p)])
            gen = base.generate(ids, max_new_tokens=len(a) + 1, do_sample=False, pad_token_id=0)
            right += gen[0, ids.shape[1]:].tolist()[: len(a)] == encode(a)
    assert right >= 5, right


def test_held_out_task_is_not_in_the_mix():
    rng = random.Random(0)
    prompts = {pretrain_example(rng)[0].split("(")[0] for _ in range(500)}
    assert prompts and not any(p.startswith("count") for p in prompts)
    train, evals = held_out_split(50, 1), held_out_split(50, 2)
    assert len({p for p, _ in train}) == 50 and all(c == str(len(p[6:-2])) for p, c in evals)


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_bad_arguments(bad):
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        main(["demo", "--seeds", bad])


def test_evaluate_with_a_bos_prefix_scores_only_the_completion():
    from hf_roste.demo.run import _dataset, evaluate
    from hf_roste.demo.tasks import BOS_ID, EOS_ID

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(shipped_base_path(), dtype=torch.float32).eval()
    pairs = held_out_split(6, 5)
    with_bos = evaluate(model, pairs, prefix=[BOS_ID])
    plain = evaluate(model, pairs)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for p, c in pairs:
            ids = torch.tensor([[BOS_ID, *encode(p + c), EOS_ID]])
            logits = model(input_ids=ids).logits[0]
            start = 1 + len(p)  # first completion position after <bos> + prompt
            loss_sum += float(torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[0, start:], reduction="sum"))
            tokens += ids.shape[1] - start
    assert with_bos["completion_tokens"] == plain["completion_tokens"] == tokens
    assert with_bos["completion_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert with_bos["completion_loss"] != pytest.approx(plain["completion_loss"], rel=1e-3)  # the prefix is seen
    ds = _dataset(pairs, "<bos>")
    assert ds[0]["prompt"] == "<bos>" + pairs[0][0] and ds[0]["completion"] == pairs[0][1]
