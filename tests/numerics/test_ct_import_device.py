"""compressed-tensors, first imported by hf_roste while a default device such as transformers' meta device is set
(as during `from_pretrained`), keeps its import-time constants on the CPU, so a later FP4 export can use them."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys, torch
import hf_roste
from hf_roste.numerics import hadamard_factors
assert "compressed_tensors.compressors.nvfp4.helpers" not in sys.modules, "imported too early for this check"
with torch.device("meta"):
    hadamard_factors._ct_factor_file()
from compressed_tensors.compressors.nvfp4 import helpers
print(helpers.kE2M1ToFloat.device.type)
"""


def test_compressed_tensors_constants_stay_on_cpu_when_first_imported_under_meta():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "cpu"
