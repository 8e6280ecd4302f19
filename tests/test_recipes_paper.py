"""The `paper` recipe variants match, field by field, the table of recipes/README.md that cites each value's
source in the authors' code (Hong-Lab-UMN-ECE/RoSTE); the table is the single statement of the authors' setup."""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path

import pytest

from hf_roste.commands.sft import parse_args, recipe_num_processes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "recipes" / "README.md").read_text()
PAPER_MODELS = ("pythia-1b", "pythia-6.9b", "qwen2.5-0.5b", "qwen2.5-7b")
VARIANTS = ("fp", "ste", "roste")


def _table(after_heading: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after the line `after_heading`."""
    text = README[README.index(after_heading):]
    rows, started = [], False
    for line in text.splitlines()[1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    assert rows and set(rows[1][0]) <= set("-"), "table header separator expected"
    return [rows[0]] + rows[2:]


SHARED = _table("Fields shared by the three variants")
PER_VARIANT = _table("Fields that differ between the variants")


def _norm(value) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) if value else "none"
    return str(value)


def _cell(cell: str) -> str:
    try:  # numbers as the YAML parser reads them (3.0e-5 -> 3e-05, 0 -> 0)
        return repr(float(cell)) if re.fullmatch(r"[0-9.e+-]+", cell) and "." in cell or "e" in cell else cell
    except ValueError:
        return cell


@pytest.fixture(scope="module")
def parsed():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return {(m, v): parse_args(["--config", f"recipes/{m}/{v}-paper.yaml", "--use_cpu", "true"])
                for m in PAPER_MODELS for v in VARIANTS}
    finally:
        os.chdir(cwd)


def _actual(field: str, script, train, model_args, roste) -> list[str]:
    """The recipe's value(s) of a table row, as text."""
    if field == "num_processes (accelerate_config)":
        return [str(recipe_num_processes(str(ROOT / script.accelerate_config)))]
    names = [n.strip() for n in field.split(",")]
    qc = roste.to_roste_config(train.rotation_search) if roste.quantize else None
    out = []
    for name in names:
        if name in ("weight_bits", "activation_bits", "kv_bits", "weight_clip_ratio", "activation_clip_ratio",
                    "kv_clip_ratio", "rotations"):
            value = getattr(qc, name)
        else:
            value = next(getattr(o, name) for o in (script, train, model_args, roste) if hasattr(o, name))
        out.append(_norm(value))
    return out


def test_tables_cover_every_model_and_variant():
    assert SHARED[0][1:5] == list(PAPER_MODELS) and SHARED[0][5] == "source"
    assert PER_VARIANT[0] == ["field", "fp-paper", "ste-paper", "roste-paper", "source"]
    for row in SHARED[1:] + PER_VARIANT[1:]:
        assert row[-1] and "`" in row[-1] or "README" in row[-1] or "default" in row[-1], row  # a cited source
    for m in PAPER_MODELS:
        assert {p.name for p in (ROOT / "recipes" / m).glob("*-paper.yaml")} == {f"{v}-paper.yaml" for v in VARIANTS}


@pytest.mark.parametrize("model", PAPER_MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_variant_matches_the_table(parsed, model, variant):
    script, train, model_args, roste = parsed[(model, variant)]
    col = 1 + PAPER_MODELS.index(model)
    for row in SHARED[1:]:
        want = [_cell(c.strip()) for c in row[col].split(",")] if row[0].count(",") else [_cell(row[col])]
        assert _actual(row[0], script, train, model_args, roste) == want, (model, variant, row[0])
    vcol = 1 + VARIANTS.index(variant)
    for row in PER_VARIANT[1:]:
        if row[vcol] == "-":
            continue
        want = [_cell(c.strip()) for c in row[vcol].split(",")] if row[0].count(",") else [_cell(row[vcol])]
        if row[0] == "rotations":
            want = [row[vcol]]
        assert _actual(row[0], script, train, model_args, roste) == want, (model, variant, row[0])


def test_paper_variant_differs_from_the_recommended_recipe_where_the_readme_says(parsed):
    """The recommended recipes keep their settings; the paper variant changes exactly the listed ones."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rec = parse_args(["--config", "recipes/qwen2.5-0.5b/roste.yaml", "--use_cpu", "true"])
    finally:
        os.chdir(cwd)
    paper = parsed[("qwen2.5-0.5b", "roste")]
    assert rec[1].completion_only_loss and not paper[1].completion_only_loss
    assert rec[2].dtype == "float32" and paper[2].dtype == "bfloat16"
    assert rec[0].legacy_chat_template is None and paper[0].legacy_chat_template == "chatml"
    assert rec[1].rotation_calibration_source == "train_sample" and paper[1].rotation_calibration_source == "first_prompts"
