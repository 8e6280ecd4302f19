"""`hf-roste demo`: the quick run completes and reports measured rows; the shipped base is pre-trained."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import xml.etree.ElementTree as ET

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_roste.cli import main
from hf_roste.demo import shipped_base_path
from hf_roste.demo.pretrain import answer_loss, base_config
from hf_roste.demo.tasks import PRETRAIN_TASKS, encode, held_out_split, pretrain_example

QUESTIONS = {"PTQ vs FP": ("sft_rtn", "fp_sft"), "RoSTE vs STE": ("roste", "ste"), "RoSTE vs RTN": ("roste", "sft_rtn"),
             "RoSTE vs rotation + RTN": ("roste", "sft_rot_rtn")}
CONCLUSION = re.compile(
    r"^  (?P<scheme>W\dA\dKV\d) (?P<q>PTQ vs FP|RoSTE vs STE|RoSTE vs RTN|RoSTE vs rotation \+ RTN): "
    r"loss (?P<loss>[+-]\d+\.\d{4}) ±(?P<loss2se>\d+\.\d{4}) \((?P<lossv>beyond noise|within noise)\), "
    r"exact match (?P<em>[+-]\d+\.\d) ±(?P<em2se>\d+\.\d) pts \((?P<emv>beyond noise|within noise)\) -> (?P<text>.+)$")


def _recompute(runs, scheme, a, b, key):
    """Independent of hf_roste.demo.conclusions: per-seed paired differences, mean, 2 SE, verdict."""
    by = {(r["seed"], r["scheme"], r["method"]): r[key] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    d = [by[(s, scheme, a)] - by[(s, "FP" if b == "fp_sft" else scheme, b)] for s in seeds]
    mean = statistics.fmean(d)
    two_se = 2 * statistics.stdev(d) / math.sqrt(len(d))
    beyond = abs(mean) > two_se and (all(x > 0 for x in d) or all(x < 0 for x in d))
    return mean, two_se, beyond


def test_quick_demo_rows_and_conclusions_follow_from_the_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file()
    rows = result["rows"]
    schemes = ["W3A3KV3", "W4A4KV4"]  # the headline first
    assert result["settings"]["schemes"] == schemes and result["headline"]["scheme"] == "W3A3KV3"
    assert "headline setting: W3A3KV3" in printed and "why 3 bits" in printed
    expected = [("FP", "fp_sft")] + [(sc, m) for sc in schemes for m in ("sft_rtn", "sft_rot_rtn", "ste", "roste")]
    assert [(r["scheme"], r["method"]) for r in rows] == expected
    table = printed[printed.index("Results: mean over"):printed.index("Noise rule:")]
    for r in rows:  # every row is printed, with its own measured loss and exact match
        line = next(x for x in table.splitlines() if x.startswith(r["scheme"]) and r["label"] in x)
        assert f"{r['completion_loss']:.4f}" in line and f"{100 * r['exact_match']:.1f}" in line
        assert math.isfinite(r["completion_loss"]) and r["completion_loss"] > 0
        assert 0.0 <= r["exact_match"] <= 1.0 and r["checkpoint_bytes"] > 0
        assert r["seeds"] == 2 and len(r["completion_loss_per_seed"]) == 2
    losses = [r["completion_loss"] for r in rows]
    assert len(set(losses)) == len(losses), losses  # every method measured on its own
    by = {(r["scheme"], r["method"]): r for r in rows}
    assert by[("W4A4KV4", "roste")]["checkpoint_bytes"] < by[("FP", "fp_sft")]["checkpoint_bytes"]
    assert by[("W3A3KV3", "ste")]["train_seconds"] > 0 and by[("W3A3KV3", "sft_rtn")]["train_seconds"] == 0
    assert len(result["runs"]) == 2 * (1 + 4 * len(schemes))

    # every conclusion: printed numbers = recomputed paired differences, verdicts and sentence follow from them
    lines = [m for m in map(CONCLUSION.match, printed.splitlines()) if m]
    assert sorted((m["scheme"], m["q"]) for m in lines) == sorted((sc, q) for sc in schemes for q in QUESTIONS)
    labels = {r["method"]: r["label"] for r in rows}
    for m in lines:
        a, b = QUESTIONS[m["q"]]
        verdicts = {}
        for key, mean_s, se_s, v_s, scale, nd in (("completion_loss", "loss", "loss2se", "lossv", 1, 4),
                                                  ("exact_match", "em", "em2se", "emv", 100, 1)):
            mean, two_se, beyond = _recompute(result["runs"], m["scheme"], a, b, key)
            assert float(m[mean_s]) == pytest.approx(round(scale * mean, nd), abs=1.1 * 10 ** -nd)
            assert float(m[se_s]) == pytest.approx(round(scale * two_se, nd), abs=1.1 * 10 ** -nd)
            assert m[v_s] == ("beyond noise" if beyond else "within noise")
            if beyond:
                a_lower = mean < 0
                verdicts[key] = "better" if a_lower == (key == "completion_loss") else "worse"
        text = m["text"]
        if not verdicts:
            assert text == f"no difference between {labels[a]} and {labels[b]} beyond seed noise (2 seeds)"
        elif len(set(verdicts.values())) == 1:
            assert text.startswith(f"{labels[a]} is {next(iter(verdicts.values()))} than {labels[b]} beyond seed noise")
            assert ("both metrics" in text) == (len(verdicts) == 2)
        else:
            assert text.startswith(f"mixed: {labels[a]} is ")
    stored = {(c["scheme"], c["question"]): c["conclusion"] for c in result["conclusions"]}
    assert all(stored[(m["scheme"], m["q"])] == m["text"] for m in lines)

    checks = result["reload_checks"]
    assert [c["scheme"] for c in checks] == schemes and all(c["all_identical"] for c in checks), checks
    assert "wall time" in printed and result["wall_seconds"] > 0

    # the figure is always drawn: per-layer rotation choices of every setting and the outlier statistics
    svg = ET.parse(out / "results.svg").getroot()
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    n_layers = len(result["outliers"])
    for sc in schemes:
        for li in range(n_layers):
            for kind in ("R2", "R3", "R4"):
                k = sum(r["rotation_layers"][li][kind] for r in result["runs"] if r["scheme"] == sc
                        and r["method"] == "roste")
                assert f"{sc} layer {li} {kind}: on in {k}/2 seeds" in titles
    for li, row in enumerate(result["outliers"]):
        for mod in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            for kind in ("before", "after"):
                st = row[mod][kind]
                assert st["tokens"] > 0 and st["max"] >= st["median"] >= 1.0
                assert f"layer {li} {mod} {kind}: typical {st['median']:.3g}, worst {st['max']:.3g}" in titles


def test_demo_rejects_a_repeated_scheme():
    with pytest.raises(SystemExit, match="names a setting twice"):
        main(["demo", "--schemes", "W3A3KV3", "W3A3KV3"])


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
