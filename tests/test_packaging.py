"""What `pip install` gives a user (issue 24): extras named as users expect, package data present in a
non-editable wheel, and the README's install lines are the ones that work from a clone."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.fail("building the wheel needs setuptools in the environment: " + proc.stderr[-500:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("hf_roste-*.whl")
    return zipfile.ZipFile(path)


def test_extras_and_entry_point(wheel):
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith("METADATA"))).decode()
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", meta, flags=re.M))
    assert {"eval", "bench", "cuda", "triton", "gguf", "all", "dev"} <= extras
    assert re.search(r"^Name: hf-roste$", meta, flags=re.M)
    entry = wheel.read(next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "hf-roste = hf_roste.cli:main" in entry


def test_package_data_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    assert "hf_roste/model_cards/roste_model_card.md.j2" in names  # the Hub card template
    assert "hf_roste/py.typed" in names
    assert {"hf_roste/data/demo_base/model.safetensors", "hf_roste/data/demo_base/config.json",
            "hf_roste/data/demo_base/tokenizer.json"} <= names  # `hf-roste demo` runs from a wheel install


def test_readme_install_lines_use_the_source_tree():
    """hf-roste is not on PyPI: every install line in the README installs the clone (`.`), with real extras."""
    readme = (ROOT / "README.md").read_text()
    lines = re.findall(r"pip install [^\n`]*", readme)
    assert lines, "the README has no install line"
    for line in lines:
        target = line.split("pip install", 1)[1].split("&&")[0].strip().replace("-e ", "").strip("'\"")
        assert target.startswith("."), line
        for extra in re.findall(r"\[([^\]]+)\]", target):
            assert set(extra.split(",")) <= {"eval", "bench", "cuda", "triton", "gguf", "all", "dev"}, line
