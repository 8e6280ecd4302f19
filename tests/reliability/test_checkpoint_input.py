"""Checkpoint input: truncated, bit-flipped, lying or mismatched files give a clear error before any
forward pass; a byte-level fuzz of a packed checkpoint only ever gives clean errors or the unchanged model."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.export.checkpoint import CheckpointError

from . import _safetensors_edit as st
from ._figures import record

EAGER = dict(attn_implementation="eager")
Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def packed(tiny_checkpoints, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32, **EAGER,
                                                 quantization_config=RoSTEConfig(rotation_search="all")).eval()
    out = tmp_path_factory.mktemp("ckpt") / "packed"
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    with torch.no_grad():
        logits = reloaded(sample_ids()).logits
    return out, logits


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, **EAGER)


def _expect(folder: Path, pattern: str):
    with pytest.raises(CheckpointError, match=pattern) as err:
        _load(folder)
    return str(err.value)


def _edit(folder: Path, fn, sign: bool = False) -> None:
    path = folder / "model.safetensors"
    header, data = st.read(path)
    out = fn(header, data)
    if out is not None:
        data = out
    if sign:
        st.resign(header, data)
    st.write(path, header, data)


# ------------------------------------------------------------------ truncation and bit flips
@pytest.mark.parametrize("where", ["8 bytes", "mid header", "end of header", "mid data", "last byte"])
def test_truncated(packed, tmp_path, where):
    d = _copy(packed[0], tmp_path / "t")
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cut = {"8 bytes": 8, "mid header": 8 + n // 2, "end of header": 8 + n, "mid data": (8 + n + len(raw)) // 2,
           "last byte": len(raw) - 1}[where]
    (d / "model.safetensors").write_bytes(raw[:cut])
    _expect(d, "truncated or corrupted|truncated")


@pytest.mark.parametrize("key", [f"{Q}.weight_packed", f"{Q}.weight_scale", f"{DOWN}.weight_zero_point",
                                 "model.embed_tokens.weight", "model.norm.weight"])
def test_bit_flip_in_data(packed, tmp_path, key):
    d = _copy(packed[0], tmp_path / "f")

    def flip(header, data):
        a, b = header[key]["data_offsets"]
        pos = (a + b) // 2
        return data[:pos] + bytes([data[pos] ^ 0x04]) + data[pos + 1 :]

    _edit(d, flip)
    _expect(d, rf"tensor '{key}' does not match its recorded digest")


# ------------------------------------------------------------------ headers that lie
def test_shape_lie_same_size_is_a_digest_mismatch_or_a_shape_error(packed, tmp_path):
    key = f"{Q}.weight_scale"
    d = _copy(packed[0], tmp_path / "a")
    _edit(d, lambda h, _: h[key].update(shape=list(reversed(h[key]["shape"]))))
    _expect(d, rf"'{key}' does not match its recorded digest")
    d2 = _copy(packed[0], tmp_path / "b")  # the forger also recomputes the digests
    _edit(d2, lambda h, _: h[key].update(shape=list(reversed(h[key]["shape"]))), sign=True)
    _expect(d2, r"weight_scale: shape \[1, 64\] in the file, \[64, 1\] expected")


def test_shape_lie_inconsistent_offsets(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")
    _edit(d, lambda h, _: h[f"{Q}.weight_packed"].update(shape=[64, 64]), sign=False)
    _expect(d, "not a readable safetensors file")


@pytest.mark.parametrize("key,new,pattern", [
    (f"{Q}.weight_scale", "I32", "dtype I32, expected F32"),
    (f"{DOWN}.weight_zero_point", "I32", "dtype I32, expected F32"),
    (f"{Q}.weight_packed", "I8", "dtype I8, expected U8 codes"),
])
def test_dtype_lie_same_size(packed, tmp_path, key, new, pattern):
    d = _copy(packed[0], tmp_path / "a")
    _edit(d, lambda h, _: h[key].update(dtype=new))
    _expect(d, "does not match its recorded digest")
    d2 = _copy(packed[0], tmp_path / "b")
    _edit(d2, lambda h, _: h[key].update(dtype=new), sign=True)
    _expect(d2, pattern)


def test_dtype_lie_inconsistent_size(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")
    _edit(d, lambda h, _: h[f"{Q}.weight_scale"].update(dtype="F16"), sign=True)
    _expect(d, "not a readable safetensors file")


def test_missing_digests(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")
    _edit(d, lambda h, _: h["__metadata__"].pop("roste_digests") and None)
    _expect(d, "digests in its metadata are missing or unreadable")


# ------------------------------------------------------------------ missing / extra / wrong tensors
def _retensor(folder: Path, fn) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hf_roste.export.checkpoint import DIGEST_KEY, tensor_digest

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    fn(tensors)
    meta[DIGEST_KEY] = json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True)
    save_file(tensors, path, metadata=meta)


def test_missing_tensor(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")
    _retensor(d, lambda t: t.pop(f"{DOWN}.weight_scale"))
    _expect(d, rf"missing tensors \['{DOWN}.weight_scale'\]")


def test_extra_tensor(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")
    _retensor(d, lambda t: t.update({"model.layers.0.mlp.gate_proj.backdoor": torch.zeros(3)}))
    _expect(d, r"unexpected tensors \['model.layers.0.mlp.gate_proj.backdoor'\]")


def test_tensor_listed_in_digests_but_absent(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")

    def drop(header, data):
        del header[f"{DOWN}.weight_scale"]

    _edit(d, drop)  # digest table still lists it; its data bytes stay, unreferenced: safetensors refuses the gap
    _expect(d, "truncated or corrupted")

    def drop_and_move(header, data):  # a consistent file without the tensor, digest table unchanged
        a, b = header.pop(f"{DOWN}.weight_scale")["data_offsets"]
        for v in header.values():
            if "data_offsets" in v and v["data_offsets"][0] >= b:
                v["data_offsets"] = [v["data_offsets"][0] - (b - a), v["data_offsets"][1] - (b - a)]
        return data[:a] + data[b:]

    d2 = _copy(packed[0], tmp_path / "b")
    _edit(d2, drop_and_move)
    _expect(d2, rf"missing tensors \['{DOWN}.weight_scale'\].*recorded in the digest table but absent")


@pytest.mark.parametrize("shape", [(64, 2), (1, 64), (64,), (32, 1)])
def test_scale_of_wrong_shape(packed, tmp_path, shape):
    d = _copy(packed[0], tmp_path / "a")
    _retensor(d, lambda t: t.update({f"{Q}.weight_scale": torch.ones(shape)}))
    _expect(d, rf"{Q}.weight_scale: shape {list(shape)}".replace("[", r"\[").replace("]", r"\]"))


def test_four_bit_codes_cannot_be_out_of_range(packed, tmp_path):
    """Every byte is two valid 4-bit codes (0..15): a re-signed file of all-0xFF codes is a different but
    well-formed model (the digest guards integrity, not authorship), and its codes stay in range."""
    d = _copy(packed[0], tmp_path / "a")
    key = f"{Q}.weight_packed"
    _edit(d, lambda h, data: st.set_tensor_bytes(h, data, key, b"\xff" * len(st.tensor_bytes(h, data, key))), sign=True)
    model = _load(d)
    q = model.get_submodule(Q)
    w = q.dequantized_weight()
    assert torch.isfinite(w).all()
    with torch.no_grad():
        assert torch.isfinite(model(sample_ids()).logits).all()


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_config_bits_disagree_with_tensor_sizes(packed, tmp_path, bits):
    d = _copy(packed[0], tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["weight_bits"] = bits
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, r"does not match its config.json.*weight_packed: shape")


@pytest.mark.parametrize("edit,field", [
    (lambda qc: qc["rotation_config"]["layers"][0].update(R4=False), "rotation_config"),
    (lambda qc: qc["rotation_config"]["layers"][1].update(R3=False), "rotation_config"),
    (lambda qc: qc.update(activation_bits=8), "activation_bits"),
    (lambda qc: qc.update(kv_bits=16), "kv_bits"),
    (lambda qc: qc.update(rotation_seed=7), "rotation_seed"),
    (lambda qc: qc.update(weight_clip_ratio=0.5), "weight_clip_ratio"),
    (lambda qc: qc.update(weight_symmetric=True), "weight_symmetric"),
], ids=["R4", "R3", "activation_bits", "kv_bits", "seed", "clip", "symmetric"])
def test_config_and_tensors_disagree_same_shapes(packed, tmp_path, edit, field):
    """Edits that keep every shape used to load silently as a different model (found here)."""
    d = _copy(packed[0], tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, rf"differs from the one this file was saved with \({field}:")


@pytest.mark.parametrize("value,pattern", [
    (float("nan"), "non-finite or non-positive"), (0.0, "non-finite or non-positive"),
    (-1.0, "non-finite or non-positive"), (float("inf"), "non-finite or non-positive"),
])
def test_bad_scale_values(packed, tmp_path, value, pattern):
    d = _copy(packed[0], tmp_path / "a")
    key = f"{Q}.weight_scale"
    _edit(d, lambda h, data: st.set_tensor_bytes(h, data, key, struct.pack("<f", value) * (len(st.tensor_bytes(h, data, key)) // 4)),
          sign=True)
    _expect(d, pattern)


@pytest.mark.parametrize("value,pattern", [(0.5, "finite integers"), (1e9, r"2\*\*20"), (float("nan"), "finite integers")])
def test_bad_zero_points(packed, tmp_path, value, pattern):
    d = _copy(packed[0], tmp_path / "a")
    key = f"{Q}.weight_zero_point"
    _edit(d, lambda h, data: st.set_tensor_bytes(h, data, key, struct.pack("<f", value) * (len(st.tensor_bytes(h, data, key)) // 4)),
          sign=True)
    _expect(d, pattern)


# ------------------------------------------------------------------ nothing is unpickled
class _Boom:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Boom.marker}",))


def test_pickle_weights_are_refused_and_never_executed(packed, tmp_path):
    d = _copy(packed[0], tmp_path / "a")
    _Boom.marker = str(tmp_path / "PWNED")
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    with pytest.raises((CheckpointError, OSError, pickle.UnpicklingError, RuntimeError)) as err:
        _load(d)
    assert str(err.value)
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------ byte-level fuzz
FUZZ_MUTATIONS = 600
FUZZ_SECONDS = 40.0
CLEAN_ERRORS = (CheckpointError, ValueError, OSError, SafetensorError)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    kind = rng.choice(["flip_header", "flip_data", "flip_length", "truncate", "insert", "overwrite_run", "delete"])
    b = bytearray(raw)
    if kind == "flip_header":
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(8, 8 + n)
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "flip_data":
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(8 + n, len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "flip_length":
        b[rng.randrange(0, 8)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[: rng.randrange(0, len(b))]
    elif kind == "insert":
        i = rng.randrange(0, len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "overwrite_run":
        i = rng.randrange(0, len(b))
        run = rng.randint(1, 64)
        b[i : i + run] = bytes(rng.randrange(256) for _ in range(min(run, len(b) - i)))
    else:
        i = rng.randrange(0, len(b))
        del b[i : i + rng.randint(1, 16)]
    return kind, bytes(b)


def test_fuzz_packed_checkpoint_bytes(packed, tmp_path):
    src, reference = packed
    raw = (src / "model.safetensors").read_bytes()
    d = _copy(src, tmp_path / "fuzz")
    rng = random.Random(20250710)
    ids = sample_ids()
    outcomes = {"clean_error": 0, "unchanged_model": 0}
    by_kind: dict[str, dict[str, int]] = {}
    error_types: dict[str, int] = {}
    bad = []
    old = signal.signal(signal.SIGALRM, _alarm)
    start = time.monotonic()
    tried = 0
    try:
        while tried < FUZZ_MUTATIONS and time.monotonic() - start < FUZZ_SECONDS:
            kind, mutated = _mutate(raw, rng)
            if mutated == raw:
                continue
            tried += 1
            (d / "model.safetensors").write_bytes(mutated)
            signal.alarm(30)
            try:
                model = _load(d).eval()
                with torch.no_grad():
                    logits = model(ids).logits
                outcome = "unchanged_model" if torch.equal(logits, reference) else "CHANGED_MODEL"
            except _Hang:
                outcome = "HANG"
            except CLEAN_ERRORS as exc:
                outcome = "clean_error" if str(exc).strip() else "EMPTY_MESSAGE"
                error_types[type(exc).__name__] = error_types.get(type(exc).__name__, 0) + 1
            except Exception as exc:  # noqa: BLE001 - anything else is a finding
                outcome = f"UNEXPECTED {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                signal.alarm(0)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            by_kind.setdefault(kind, {}).setdefault(outcome.split(":")[0], 0)
            by_kind[kind][outcome.split(":")[0]] += 1
            if outcome not in ("clean_error", "unchanged_model"):
                bad.append((kind, outcome))
    finally:
        signal.signal(signal.SIGALRM, old)
    elapsed = time.monotonic() - start
    record("checkpoint_byte_fuzz", mutations_tried=tried, max_mutations=FUZZ_MUTATIONS, time_budget_s=FUZZ_SECONDS,
           elapsed_s=round(elapsed, 1), seed=20250710, outcomes=outcomes, error_types=error_types, by_kind=by_kind,
           file_bytes=len(raw))
    assert not bad, bad[:10]
    assert tried >= 50, tried
