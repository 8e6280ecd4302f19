"""Numerical input: NaN/Inf, all-zero and constant rows, extreme magnitudes, bf16/fp16, through the QAT
and packed modules; a non-finite training loss is reported and never applied."""

from __future__ import annotations

import logging
import math
import os
import sys

import pytest
import torch

from hf_roste.modules.packed_linear import PackedLinear
from hf_roste.modules.qat_linear import QATLinear
from hf_roste.numerics import QuantSpec, fake_quantize
from hf_roste.numerics.hadamard import hadamard_transform

from ._figures import record

IN, OUT = 64, 48
# finite rows per dtype: (name, row); magnitudes chosen so the *layer output* cannot overflow the dtype
FINITE_ROWS = {
    torch.float32: [("normal", None), ("zeros", 0.0), ("constant", 5.0), ("huge", 1e30), ("tiny", 1e-30),
                    ("subnormal", 1e-40), ("mixed", "mixed")],
    torch.bfloat16: [("normal", None), ("zeros", 0.0), ("constant", -3.0), ("huge", 1e30), ("tiny", 1e-30),
                     ("mixed", "mixed")],
    torch.float16: [("normal", None), ("zeros", 0.0), ("constant", 2.0), ("large", 300.0), ("tiny", 1e-4),
                    ("subnormal", 1e-7), ("mixed", "mixed")],
}
NONFINITE = [("nan", math.nan), ("+inf", math.inf), ("-inf", -math.inf)]


def _rows(dtype):
    g = torch.Generator().manual_seed(0)
    rows, names = [], []
    for name, v in FINITE_ROWS[dtype]:
        if v is None:
            r = torch.randn(IN, generator=g)
        elif v == "mixed":
            big = 1e30 if dtype != torch.float16 else 300.0
            r = torch.randn(IN, generator=g) * 1e-3
            r[::7] = big
        else:
            r = torch.full((IN,), float(v))
        rows.append(r)
        names.append(name)
    finite = len(rows)
    for name, v in NONFINITE:
        r = torch.randn(IN, generator=g)
        r[IN // 3] = v
        rows.append(r)
        names.append(name)
    return torch.stack(rows).to(dtype), names, finite


def _layers(symmetric: bool, hadamard: bool, act_bits: int = 4):
    torch.manual_seed(0)
    w_spec = QuantSpec(4, symmetric, 0.95, "channel")
    a_spec = QuantSpec(act_bits, symmetric, 0.95, "token")
    lin = torch.nn.Linear(IN, OUT)
    qat = QATLinear.from_linear(lin, w_spec, a_spec, input_hadamard=hadamard)
    packed = PackedLinear.from_float(lin.weight.detach(), lin.bias.detach(), w_spec, a_spec,
                                     input_transform=hadamard_transform if hadamard else None)
    return qat, packed


_checked = {"layer_configs": 0, "rows_checked": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["noR4", "R4"])
def test_qat_and_packed_modules_on_extreme_rows(dtype, symmetric, hadamard):
    x, names, n_finite = _rows(dtype)
    qat, packed = _layers(symmetric, hadamard)
    qat, packed = qat.to(dtype), packed
    with torch.no_grad():
        q_in = qat.quantize_input(x)
        y_qat = qat(x)
        y_packed = packed(x)
    assert q_in.dtype == y_qat.dtype == y_packed.dtype == dtype
    # the quantizer output is finite for every finite row, and these rows' layer outputs too
    for i in range(n_finite):
        assert torch.isfinite(q_in[i]).all(), (names[i], q_in[i])
        assert torch.isfinite(y_qat[i]).all(), (names[i], y_qat[i])
        assert torch.isfinite(y_packed[i]).all(), (names[i], y_packed[i])
    # documented: an all-zero row quantizes to exact zeros; a constant row is exact when asymmetric
    if not hadamard:
        zi = names.index("zeros")
        assert torch.equal(q_in[zi], torch.zeros_like(q_in[zi]))
        ci = names.index("constant")
        if not symmetric:
            assert torch.equal(q_in[ci], x[ci])
    # documented: a row holding NaN or +-Inf becomes all NaN; the other rows are unaffected
    for i in range(n_finite, len(names)):
        assert torch.isnan(q_in[i]).all(), names[i]
        assert torch.isnan(y_packed[i]).all() and torch.isnan(y_qat[i]).all(), names[i]
    with torch.no_grad():
        alone = packed(x[:n_finite])
        alone_qat = qat(x[:n_finite])
    assert torch.equal(alone, y_packed[:n_finite])
    # the QAT product is a float GEMM: another batch size may sum in another order, which moves each output by
    # at most a few roundings of sum_k |x_k w_k| (cancelling rows such as "mixed" make that large next to |y|)
    with torch.no_grad():
        wq = fake_quantize(qat.weight.float(), qat.weight_spec)
        bound = 8 * torch.finfo(dtype).eps * (q_in[:n_finite].float().abs() @ wq.abs().T) + torch.finfo(dtype).tiny
    assert torch.isfinite(alone_qat).all() and torch.isfinite(y_qat[:n_finite]).all()
    assert ((alone_qat.float() - y_qat[:n_finite].float()).abs() <= bound).all()
    _checked["layer_configs"] += 1
    _checked["rows_checked"] += len(names)


def test_gradients_through_extreme_rows_stay_finite():
    qat, _ = _layers(False, True)
    x, names, n_finite = _rows(torch.float32)
    x = x[:n_finite].clone().requires_grad_(True)
    y = qat(x)
    (y.float() * 1e-30).sum().backward()  # scaled so the huge rows' products stay in range
    assert torch.isfinite(x.grad).all() and torch.isfinite(qat.weight.grad).all()
    record("numerical_modules", dtypes=["float32", "bfloat16", "float16"], **_checked,
           finite_row_kinds=sorted({n for rows in FINITE_ROWS.values() for n, _ in rows}),
           nonfinite_row_kinds=[n for n, _ in NONFINITE])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_whole_models_in_half_precision(tiny_checkpoints, tmp_path, dtype):
    from tiny_models import sample_ids
    from transformers import AutoModelForCausalLM

    from hf_roste import RoSTEConfig

    qat = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], dtype=dtype,
                                               quantization_config=RoSTEConfig(rotation_search="all"))
    with torch.no_grad():
        assert torch.isfinite(qat(sample_ids()).logits.float()).all()
    qat.save_pretrained(tmp_path / "p")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=dtype)
    with torch.no_grad():
        logits = packed(sample_ids()).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


# ------------------------------------------------------------------ non-finite training loss
def test_nonfinite_loss_is_reported_and_not_applied(tiny_checkpoints, tmp_path, caplog):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
    from train_script import build_trainer
    from transformers import TrainerCallback

    trainer = build_trainer(str(tiny_checkpoints["llama"]), str(tmp_path / "nan"), max_steps=5, save_steps=0, per_device=8)
    snapshots: dict[int, list[torch.Tensor]] = {}

    class Snap(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            snapshots[state.global_step] = [p.detach().clone() for p in trainer.model.parameters()]

        def on_train_end(self, args, state, control, **kw):
            snapshots[state.global_step] = [p.detach().clone() for p in trainer.model.parameters()]

    trainer.add_callback(Snap())
    calls = {"n": 0}
    original = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        out = original(model, inputs, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd optimizer step's loss is NaN (its gradients are NaN too)
            out = (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    trainer.compute_loss = poisoned
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.skipped_nonfinite_steps == [3]
    assert any("non-finite training loss" in r.getMessage() and "optimizer step 3" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(snapshots[a], snapshots[b], strict=True))

    assert same(2, 3), "the NaN step changed the weights"
    assert not same(1, 2) and not same(3, 4), "ordinary steps must still train"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logged)
    assert any(h.get("roste/skipped_nonfinite_steps") == 1.0 for h in logged)
