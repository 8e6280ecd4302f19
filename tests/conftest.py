from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():
    # Triton kernels run through Triton's interpreter on CPU (HF_ROSTE_TRITON=1 in the kernel tests); it
    # must be chosen before anything imports triton (transformers' optional integrations do).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from tiny_models import TINY_CONFIGS, save_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved full-precision checkpoint per tiny family (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def shared_model_configs() -> dict[str, dict]:
    """Shapes of the real target models (`shared/data/model_configs.json`, mirrored in tests/data)."""
    import json

    path = Path(__file__).parent / "data" / "model_configs.json"
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


@pytest.fixture
def onednn_on(monkeypatch):
    """Use oneDNN's int8 GEMM wherever the op exists, whatever the per-machine speed probe decided
    (both kernel routes must stay correct on every machine, not only where oneDNN is the faster)."""
    import hf_roste.numerics.onednn as dnn

    monkeypatch.setattr(dnn, "onednn_int8_enabled", lambda: hasattr(torch.ops.onednn, "qlinear_prepack"))
