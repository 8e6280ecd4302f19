"""Environment: missing optional packages name the extra to install; CPU-only runs never touch CUDA;
HF_HUB_OFFLINE=1 is respected (no network attempt, a fast clear error)."""

from __future__ import annotations

import socket
import sys
import time

import pytest
import torch
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig


def _hide(monkeypatch, *modules):
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_missing_rouge_score_names_the_extra(monkeypatch):
    from hf_roste import evaluation

    _hide(monkeypatch, "rouge_score")
    with pytest.raises(ImportError, match=r"hf-roste\[eval\].*rouge-score"):
        evaluation.rouge_scores(["a b"], ["a b"])


ROTATION_ERRORS = {"R1": True, "layers": [{"R2": True, "R3": False, "R4": True}] * 2,
                   "errors": [{"R2": [0.2, 0.1], "R3": [0.1, 0.3], "R4": [0.3, 0.2]}] * 2}


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    from hf_roste.export.model_card import plot_rotation_errors

    _hide(monkeypatch, "matplotlib")
    cfg = RoSTEConfig(rotation_search="all", rotation_config=ROTATION_ERRORS)
    with pytest.raises(ImportError, match=r"hf-roste\[eval\]|matplotlib.*pip install"):
        plot_rotation_errors(cfg, tmp_path / "plot.png")


def test_demo_figure_needs_no_plotting_package(monkeypatch):
    """The demo's figure is an SVG drawn with the standard library: without matplotlib it still imports and
    no module of hf_roste.demo imports matplotlib (the plot is part of every default install)."""
    import ast
    import importlib
    from pathlib import Path

    _hide(monkeypatch, "matplotlib")
    monkeypatch.delitem(sys.modules, "hf_roste.demo.figure", raising=False)
    figure = importlib.import_module("hf_roste.demo.figure")
    assert callable(figure.render_svg)
    demo_dir = Path(figure.__file__).parent
    for path in demo_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "matplotlib" for n in names), path


def test_missing_fast_hadamard_transform_falls_back_on_cpu(monkeypatch):
    """fast-hadamard-transform (extra `cuda`) is only ever used on CUDA; without it the torch path runs."""
    from hf_roste.numerics import hadamard

    x = torch.randn(4, 96)
    expected = hadamard.hadamard_transform(x)
    _hide(monkeypatch, "fast_hadamard_transform")
    hadamard._fht_module.cache_clear()
    try:
        assert hadamard._fht_module() is None
        assert torch.equal(hadamard.hadamard_transform(x), expected)
    finally:
        hadamard._fht_module.cache_clear()


# ------------------------------------------------------------------ no GPU
def test_cpu_only_runs_never_touch_cuda(tiny_checkpoints, tmp_path, monkeypatch):
    qat = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32,
                                               quantization_config=RoSTEConfig(rotation_search="all")).eval()
    qat.save_pretrained(tmp_path / "p")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    touched = []

    def forbidden(name):
        def fn(*a, **k):
            touched.append(name)
            raise AssertionError(f"CUDA API {name} called in a CPU-only forward")
        return fn

    for name in ("is_available", "current_device", "device_count", "synchronize", "_lazy_init", "init",
                 "get_device_capability", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    ids = sample_ids()
    with torch.no_grad():
        for model in (qat, packed):
            assert torch.isfinite(model(ids).logits).all()
            model.generate(ids[:, :4], max_new_tokens=8, do_sample=False)
    qat.train()
    qat(ids, labels=ids).loss.backward()
    assert not touched and not torch.cuda.is_initialized()
    assert all(p.device.type == "cpu" for p in list(qat.parameters()) + list(packed.buffers()))


# ------------------------------------------------------------------ offline mode
def test_hub_offline_fails_fast_without_network(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts = []
    real_connect = socket.socket.connect

    def no_network(self, address, *a, **k):
        if isinstance(address, tuple):  # inet sockets only (not unix sockets)
            attempts.append(address)
            raise OSError("network attempted in offline mode")
        return real_connect(self, address, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.monotonic()
    with pytest.raises(OSError) as err:
        AutoModelForCausalLM.from_pretrained("hf-roste-tests/definitely-not-cached-roste-model",
                                             quantization_config=RoSTEConfig())
    elapsed = time.monotonic() - start
    assert not attempts, attempts
    assert elapsed < 10, elapsed
    msg = str(err.value)
    assert "offline" in msg.lower() and "cache" in msg.lower(), msg  # transformers' message (it omits the repo id)


def test_push_refuses_offline_before_writing(tiny_checkpoints, monkeypatch):
    from huggingface_hub import constants

    from hf_roste.export.hub import HubPushError, push_roste_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_roste_model(str(tiny_checkpoints["llama"]), "me/x", token="hf_x")
