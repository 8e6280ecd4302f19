"""An export never writes into the folder it reads (issue 24): paths, ``..`` and symbolic links resolved."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.cli import main as cli_main
from hf_roste.export.compressed_tensors import export_compressed_tensors
from hf_roste.export.paths import OutputIsSourceError, check_output_is_not_source

EXPORTABLE = dict(activation_symmetric=True, weight_symmetric=True, kv_symmetric=True, rotations=("R1", "R2", "R4"),
                  rotation_search="all", activation_clip_ratio=1.0, kv_clip_ratio=1.0)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], quantization_config=RoSTEConfig(**EXPORTABLE), dtype=torch.float32,
        attn_implementation="eager").eval()
    root = tmp_path_factory.mktemp("src")
    model.save_pretrained(root / "ckpt")
    return root


def _aliases(root: Path) -> list[str]:
    link = root / "link"
    if not link.exists():
        os.symlink(root / "ckpt", link)
    return [str(root / "ckpt"), str(root / "ckpt") + "/", str(root / "ckpt" / ".." / "ckpt"), str(link)]


def test_cli_refuses_output_that_is_the_source(saved, capsys):
    before = _digest(saved / "ckpt")
    for out in _aliases(saved):
        assert cli_main(["export", str(saved / "ckpt"), out, "--non-strict"]) == 2, out
        err = capsys.readouterr().err
        assert "is the source folder" in err and "different output folder" in err
    assert _digest(saved / "ckpt") == before


def test_library_refuses_output_that_is_the_source(saved):
    before = _digest(saved / "ckpt")
    for out in _aliases(saved):
        with pytest.raises(OutputIsSourceError, match="would overwrite"):
            export_compressed_tensors(saved / "ckpt", out, strict=False)
    model = AutoModelForCausalLM.from_pretrained(saved / "ckpt", dtype=torch.float32)
    with pytest.raises(OutputIsSourceError):  # a model loaded from the folder: its name_or_path is the source
        export_compressed_tensors(model, saved / "link", strict=False)
    assert _digest(saved / "ckpt") == before


def test_other_folders_are_accepted(saved, tmp_path):
    check_output_is_not_source(saved / "ckpt", tmp_path / "ct")
    check_output_is_not_source(saved / "ckpt", saved / "ckpt-ct")
    check_output_is_not_source(torch.nn.Linear(2, 2), saved / "ckpt")  # no source folder known
