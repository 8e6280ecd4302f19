"""When hf_roste runs its Triton kernels.

``HF_ROSTE_TRITON`` selects it, read at every call so tests can switch it:

* ``auto`` (default): on CUDA tensors whenever ``triton`` imports; never on CPU tensors;
* ``0``: never (the PyTorch reference path everywhere);
* ``1``: also on CPU tensors. That needs Triton's interpreter (``TRITON_INTERPRET=1`` set before
  ``triton`` is imported); it is slow and meant for tests that prove the kernels equal the reference.

Triton ships with the CUDA builds of PyTorch; on a CPU-only install it is an optional extra
(``pip install "hf-roste[triton]"``), needed only to run the kernel tests.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "triton_mode", "use_triton"]

_MODES = ("auto", "0", "1")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def triton_mode() -> str:
    """The value of ``HF_ROSTE_TRITON`` (``auto``, ``0`` or ``1``), checked."""
    mode = os.environ.get("HF_ROSTE_TRITON", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"HF_ROSTE_TRITON={mode!r} is not understood: use one of {', '.join(_MODES)}.")
    return mode


def use_triton(device: torch.device | str) -> bool:
    """Whether a tensor on ``device`` goes through the Triton kernels (see the module docstring)."""
    mode = triton_mode()
    if mode == "0" or not triton_available():
        return False
    device_type = torch.device(device).type
    if device_type == "cuda":
        return True
    if mode == "1":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "HF_ROSTE_TRITON=1 on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or unset HF_ROSTE_TRITON to use the PyTorch path."
            )
        return True
    return False
