"""A RoSTE checkpoint loaded without ``import hf_roste`` fails with the fix in the message, and
``ignore_mismatched_sizes=True`` does not turn that into a model of freshly initialised weights (issue 24)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, save_format
from hf_roste.export.load_guard import LOAD_GUARD_FILE, guard_supported

PLAIN_LOAD = textwrap.dedent("""
    import sys, json
    from transformers import AutoModelForCausalLM
    kwargs = json.loads(sys.argv[2])
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
    except Exception as exc:
        print("FAILED", type(exc).__name__, exc)
    else:
        print("LOADED")
    assert "hf_roste" not in sys.modules, "the check must run without hf_roste imported"
""")


@pytest.fixture(scope="module", params=["packed", "master"])
def saved(request, tiny_checkpoints, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mistral"], quantization_config=RoSTEConfig(),
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    out = tmp_path_factory.mktemp("guard") / request.param
    with save_format(model, request.param):
        model.save_pretrained(out)
    return model, out


def _plain_load(folder, **kwargs) -> str:
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not guard_supported(), reason="this transformers has no quantizer hook to lift the guard")
@pytest.mark.parametrize("kwargs", [{}, {"ignore_mismatched_sizes": True}], ids=["plain", "ignore_mismatched_sizes"])
def test_plain_transformers_load_fails_and_names_the_fix(saved, kwargs):
    _, folder = saved
    assert json.loads((folder / "config.json").read_text())["transformers_weights"] == LOAD_GUARD_FILE
    line = _plain_load(folder, **kwargs)
    assert line.startswith("FAILED"), line
    assert "import-hf_roste" in line and "pip-install-hf-roste" in line, line


def test_hf_roste_load_is_unaffected(saved, tmp_path):
    model, folder = saved
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert "transformers_weights" not in reloaded.config.to_dict()
    ids = sample_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)
    reloaded.save_pretrained(tmp_path / "again")  # re-saved with the guard, reloads again
    assert json.loads((tmp_path / "again" / "config.json").read_text()).get("transformers_weights") == (
        LOAD_GUARD_FILE if guard_supported() else None)
    AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)

