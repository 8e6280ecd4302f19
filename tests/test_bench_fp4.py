"""bench/quality.py FP4 rows: configs and the quick path of one seed (tiny settings, demo base)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_fp4_scheme_configs():
    from bench.quality import FP4_SCHEMES, INT_SCHEMES, roste_config

    assert set(FP4_SCHEMES) == {"NVFP4-W4A4KV4", "NVFP4-W4A4KV8", "MXFP4-W4A4KV4", "MXFP4-W4A4KV8"}
    assert not set(FP4_SCHEMES) & set(INT_SCHEMES)
    cfg = roste_config("MXFP4-W4A4KV8", "none")
    assert (cfg.weight_format, cfg.activation_format, cfg.kv_bits, cfg.rotations) == ("mxfp4", "mxfp4", 8, ())
    cfg = roste_config("NVFP4-W4A4KV4", "all")
    assert cfg.weight_spec.format == "nvfp4" and cfg.kv_bits == 4 and cfg.rotation_search == "all"
    assert roste_config("W4A4KV4", "adaptive").weight_format == "int"


@pytest.mark.slow
def test_quality_quick_path_runs_fp4_rows(tmp_path):
    from bench.quality import aggregate, run_seed
    from hf_roste.demo.run import shipped_base_path

    settings = dict(seeds=1, steps=1, batch_size=4, learning_rate=1e-3, train_examples=8, eval_prompts=4,
                    calibration_samples=2, schemes=["NVFP4-W4A4KV4"], bos=False)
    rows = run_seed(0, settings, str(shipped_base_path()), str(tmp_path))
    got = {(r["method"], r["scheme"]) for r in rows}
    assert got == {("fp_sft", "FP"), *((m, "NVFP4-W4A4KV4") for m in ("sft_rtn", "sft_rot_rtn", "ste", "roste"))}
    assert all(r["completion_loss"] > 0 and 0 <= r["exact_match"] <= 1 for r in rows)
    table, diffs = aggregate(rows, settings["schemes"])
    assert {r["method"] for r in table} == {m for m, _ in got}
    assert {(d["a"], d["b"]) for d in diffs} == {("roste", "ste"), ("roste", "sft_rtn"), ("roste", "sft_rot_rtn"),
                                                  ("ste", "sft_rtn"), ("sft_rot_rtn", "sft_rtn")}
    assert all(d["completion_loss"]["verdict"] == "n/a (1 seed)" for d in diffs)  # one seed: no noise verdict
    assert not any(d.get("scheme_b") for d in diffs)  # no int setting of the same bits in this run


def test_fp4_settings_are_paired_with_the_int_setting_of_the_same_bits():
    from bench.quality import aggregate, int_counterpart

    assert int_counterpart("NVFP4-W4A4KV4") == int_counterpart("MXFP4-W4A4KV4") == "W4A4KV4"
    assert int_counterpart("W4A4KV4") is None
    runs = [{"seed": s, "scheme": sc, "method": m, "completion_loss": loss, "exact_match": 1.0, "train_seconds": 1.0}
            for s, off in ((0, 0.0), (1, 0.01), (2, 0.02))
            for sc, m, loss in (("FP", "fp_sft", 0.1 + off), ("W4A4KV4", "roste", 0.3 + off), ("W4A4KV4", "ste", 0.4),
                                ("NVFP4-W4A4KV4", "roste", 0.2 + 2 * off), ("NVFP4-W4A4KV8", "roste", 0.25))]
    _, diffs = aggregate(runs, ["W4A4KV4", "NVFP4-W4A4KV4", "NVFP4-W4A4KV8"])
    cross = [d for d in diffs if d.get("scheme_b")]
    assert [(d["scheme"], d["scheme_b"], d["a"]) for d in cross] == [("NVFP4-W4A4KV4", "W4A4KV4", "roste")]
    cl = cross[0]["completion_loss"]
    assert cl["per_seed"] == pytest.approx([-0.1, -0.09, -0.08]) and cl["verdict"] == "beyond noise"
