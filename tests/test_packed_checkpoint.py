"""Packed int checkpoints: save, reload, fidelity, dequantize, corrupted files (issue 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import TINY_CONFIGS, sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state, save_format, set_quantization_enabled
from hf_roste.export.checkpoint import CheckpointError
from hf_roste.modules.packed_linear import PackedLinear

EAGER = dict(attn_implementation="eager")


def _qat(path, **cfg):
    cfg.setdefault("rotation_search", "all")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32,
                                                **EAGER).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoints):
    """A tiny Llama QA-trained for a few steps on a counting task, and its packed save."""
    torch.manual_seed(0)
    model = _qat(tiny_checkpoints["llama"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        g = torch.Generator().manual_seed(step)
        start = torch.randint(0, 100, (8, 1), generator=g)
        ids = (start + torch.arange(24)) % 128
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("packed") / "ckpt"
    model.save_pretrained(out)
    return model, out


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_packed_round_trip_every_family(tiny_checkpoints, tmp_path, kind):
    model = _qat(tiny_checkpoints[kind])
    ids = sample_ids()
    with torch.no_grad():
        qat = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "packed" and cfg["rotation_seed"] == 0 and cfg["format_version"] == 1
    assert len(cfg["rotation_config"]["layers"]) == 2
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "a", output_loading_info=True, **EAGER)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    state = get_state(reloaded)
    assert state.packed
    paths = state.adapter.quantized_linear_paths(reloaded)
    assert all(isinstance(reloaded.get_submodule(p), PackedLinear) for p in paths)
    with torch.no_grad():
        packed = reloaded.eval()(ids).logits
    assert (packed - qat).abs().max() <= 1e-5 * qat.abs().max()
    reloaded.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_layout_and_size(trained):
    model, out = trained
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qp = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
        assert qp.dtype == torch.uint8 and tuple(qp.shape) == (64, 32)  # 4-bit: two codes per byte
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").numel() == 0  # marker
    assert "model.layers.0.mlp.down_proj.weight_zero_point" in keys
    linear_params = sum(model.get_submodule(p).weight.numel() for p in get_state(model).adapter.quantized_linear_paths(model))
    packed_bytes = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k in keys:
            if k.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point"):
                t = f.get_tensor(k)
                packed_bytes += t.numel() * t.element_size()
    # 0.5 byte per code + 8 bytes (scale, zero) per output row of 64..128 inputs
    assert packed_bytes / linear_params < 0.5 + 8 / 64 + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device_map", [None, "cpu", "auto"])
def test_load_dtypes_and_device_maps(trained, dtype, device_map):
    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=device_map, **EAGER)
    buffers = dict(model.named_buffers())
    assert buffers["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert buffers["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.uint8
    assert model.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        assert torch.isfinite(model(sample_ids()).logits.float()).all()


def test_packed_generations_equal_qat(trained):
    model, out = trained
    packed = AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    g = torch.Generator().manual_seed(7)
    prompts = (torch.randint(0, 100, (20, 1), generator=g) + torch.arange(6)) % 128
    qat_gen = model.generate(prompts, max_new_tokens=32, do_sample=False)
    packed_gen = packed.generate(prompts, max_new_tokens=32, do_sample=False)
    assert torch.equal(qat_gen, packed_gen)
    with torch.no_grad():
        a, b = model(qat_gen).logits, packed(qat_gen).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_reload_in_fresh_process(trained, tmp_path):
    model, out = trained
    ids = sample_ids()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    code = (
        "import torch, hf_roste; from transformers import AutoModelForCausalLM as A;"
        f"d = torch.load({str(tmp_path / 'io.pt')!r}); m = A.from_pretrained({str(out)!r}, attn_implementation='eager');"
        "e = d['expected']; print(float((m(d['ids']).logits - e).abs().max() / e.abs().max()))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-5


def test_loading_without_hf_roste_fails_loudly(trained):
    _, out = trained
    code = (
        "from transformers import AutoModelForCausalLM as A\n"
        f"A.from_pretrained({str(out)!r})\n"
        "print('LOADED SILENTLY')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "LOADED SILENTLY" not in res.stdout
    assert "import-hf_roste" in res.stderr  # the failure names the fix (hf_roste.export.load_guard)


def test_dequantize_gives_plain_model_equal_to_qat_without_quantization(tiny_checkpoints, tmp_path):
    for kind in ("qwen2", "gpt_neox"):
        model = _qat(tiny_checkpoints[kind])
        set_quantization_enabled(model, False)
        ids = sample_ids()
        with torch.no_grad():
            expected = model(ids).logits
        plain = model.dequantize()
        assert not hasattr(plain, "roste") and getattr(plain.config, "quantization_config", None) is None
        assert all(type(m).__name__ not in ("QATLinear", "PackedLinear", "RMSNorm") for m in plain.modules())
        with torch.no_grad():
            assert (plain(ids).logits - expected).abs().max() <= 1e-5 * expected.abs().max()
        plain.save_pretrained(tmp_path / kind)
        code = (
            "import torch; from transformers import AutoModelForCausalLM as A;"
            f"m = A.from_pretrained({str(tmp_path / kind)!r}, attn_implementation='eager'); print(type(m).__name__)"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "ForCausalLM" in res.stdout, res.stderr[-1500:]


def test_dequantize_after_save_pretrained(tiny_checkpoints, tmp_path):
    # save_pretrained turns the live model.config.dtype into a string ("float32")
    model = _qat(tiny_checkpoints["llama"])
    model.save_pretrained(tmp_path / "packed")
    assert isinstance(model.config.dtype, str)
    plain = model.dequantize()
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    with pytest.raises(ValueError, match="not a torch dtype"):
        _qat(tiny_checkpoints["llama"]).dequantize(dtype="float33")


def test_dequantize_packed_model_uses_dequantized_codes(trained):
    model, out = trained
    packed = AutoModelForCausalLM.from_pretrained(out, **EAGER)
    w_q = packed.model.layers[0].self_attn.q_proj.dequantized_weight()
    plain = packed.dequantize()
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, w_q)


# --------------------------------------------------------------------------- corrupted checkpoints
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(folder: Path, fn) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata=meta)


def test_truncated_file(trained, tmp_path):
    d = _copy(trained[1], tmp_path / "t")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(d)


def test_wrong_shapes_and_missing_scales(trained, tmp_path):
    d = _copy(trained[1], tmp_path / "s")
    key = "model.layers.1.mlp.up_proj.weight_scale"
    _edit_tensors(d, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing tensors.*up_proj.weight_scale"):
        AutoModelForCausalLM.from_pretrained(d)
    d2 = _copy(trained[1], tmp_path / "s2")

    def reshape(t):
        t["model.layers.0.self_attn.o_proj.weight_packed"] = t["model.layers.0.self_attn.o_proj.weight_packed"][:, :-1].clone()

    _edit_tensors(d2, reshape)
    with pytest.raises(CheckpointError, match="digest|shape"):
        AutoModelForCausalLM.from_pretrained(d2)


def test_bit_flip_in_a_scale_is_detected(trained, tmp_path):
    d = _copy(trained[1], tmp_path / "f")
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 100] ^= 0x10  # a byte inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_and_tensors_disagree(trained, tmp_path):
    d = _copy(trained[1], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["weight_bits"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json.*weight_packed: shape"):
        AutoModelForCausalLM.from_pretrained(d)
    cfg["quantization_config"]["weight_bits"] = 4
    cfg["quantization_config"]["checkpoint_format"] = "master"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="metadata says checkpoint format 'packed' but config.json says 'master'"):
        AutoModelForCausalLM.from_pretrained(d)


def test_unknown_format_version(trained, tmp_path):
    d = _copy(trained[1], tmp_path / "v")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99.*reads versions up to 1"):
        AutoModelForCausalLM.from_pretrained(d)


def test_packed_model_refuses_rotation_changes(trained):
    from hf_roste import set_rotation_config

    packed = AutoModelForCausalLM.from_pretrained(trained[1])
    with pytest.raises(ValueError, match="packed RoSTE checkpoint"):
        set_rotation_config(packed, get_state(packed).applied)
    with pytest.raises(ValueError, match="master"):
        save_format(packed, "master")
