"""`hf-roste demo`: the paper's comparison on a small pre-trained model, on CPU, in minutes.

- `tasks.py`: the character tokenizer, the synthetic pretraining mix and the held-out task;
- `pretrain.py`: how the shipped base `hf_roste/data/demo_base/` was produced (`--pretrain`);
- `run.py`: FP SFT, SFT + RTN, SFT + rotation + RTN, STE QA-SFT and RoSTE QA-SFT, evaluated on the
  same held-out prompts, plus the save / reload / generate check of the RoSTE model;
- `conclusions.py`: paired differences, the noise rule, and the printed conclusions derived from them;
- `outliers.py`: outlier statistics at the quantized linears' inputs, before and after rotation;
- `report.py`: aggregation, table, JSON and Markdown; `figure.py`: the SVG figure (no plotting dependency).
"""

from __future__ import annotations

from .run import DemoSettings, run_comparison, shipped_base_path

QUICK = dict(seeds=2, steps=4, batch_size=8, train_examples=64, eval_prompts=32, calibration_samples=8,
             reload_check_prompts=8, outlier_prompts=8)


def run_demo(output_dir: str = "roste-demo", *, quick: bool = False, **overrides) -> dict:
    """Run the demo (see `DemoSettings`); `quick=True` shrinks every size for tests."""
    kw = dict(QUICK) if quick else {}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return run_comparison(DemoSettings(output_dir=output_dir, quick=quick, **kw))


__all__ = ["DemoSettings", "QUICK", "run_comparison", "run_demo", "shipped_base_path"]
