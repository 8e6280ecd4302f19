"""Adaptive rotation configuration search: planted structure, padding, determinism, round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import VOCAB, build_tiny
from transformers import AutoModelForCausalLM

from hf_roste import (
    RoSTEConfig,
    get_state,
    rotate_optimizer_state,
    sample_calibration_batches,
    search_rotation_config,
    set_quantization_enabled,
    set_rotation_config,
)

W4A4KV4 = dict(weight_bits=4, activation_bits=4, kv_bits=4)
ALL = ("R2", "R3", "R4")


def _load(path, **cfg):
    cfg = {**W4A4KV4, "rotation_search": "none", **cfg}
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _data(n=24, seed=0, lo=5, hi=33):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [{"input_ids": torch.randint(0, VOCAB, (int(k),), generator=g).tolist()} for k in lengths]


def _batches(n=16, seed=0, batch_size=4):
    return sample_calibration_batches(_data(), n, seed=seed, batch_size=batch_size)


def _flags(model, **on):
    n = get_state(model).adapter.num_layers(model)
    return {"R1": True, "layers": [{k: bool(on.get(k, False)) for k in ALL} for _ in range(n)]}


# ---------------------------------------------------------------- independent reference numerics
def _ref_quant(x: torch.Tensor, bits=4, c=0.95) -> torch.Tensor:
    """Asymmetric per-row RTN written from the method note (not the library's code)."""
    x = x.double()
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    qmax = 2**bits - 1
    s = c * (mx - mn) / qmax
    z = torch.round(-c * mn / s)
    q = torch.clamp(torch.round(x / s) + z, 0, qmax)
    return (q - z) * s


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _ref_err(x: torch.Tensor) -> torch.Tensor:
    """Per-row ||Q(x) - x||^2."""
    return (_ref_quant(x) - x.double()).square().sum(-1)


# ---------------------------------------------------------------- planted structure
@torch.no_grad()
def _plant(model):
    """Layer 0: four moderately large down_proj input channels; layer 1: one extreme channel."""
    layers = model.model.layers
    m0 = layers[0].mlp
    m0.up_proj.weight.mul_(10.0)  # input errors dominate the (data-independent) weight errors
    m0.down_proj.weight.div_(10.0)
    m0.up_proj.weight[[3, 40, 77, 101]] *= 12.0
    m1 = layers[1].mlp
    m1.up_proj.weight[5] *= 3000.0
    m1.gate_proj.weight[5] *= 20.0
    m1.down_proj.weight[:, 5] /= 3000.0


@pytest.mark.parametrize("block", [None, 32], ids=["full_r4", "block32_r4"])
def test_planted_structure_r4_follows_independent_errors(tiny_checkpoints, block):
    """The search measures the R4 the model applies: full-size, or block-diagonal (r4_block_size)."""
    model = _load(tiny_checkpoints["llama"], rotations=("R1", "R4"), r4_block_size=block)
    _plant(model)
    batches = _batches()
    # independent measurement: capture down_proj inputs with quantization off, quantize here
    xs = {0: [], 1: []}
    hooks = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
        lambda m, a, i=i: xs[i].append(a[0].detach().clone())) for i in (0, 1)]
    set_quantization_enabled(model, False)
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    set_quantization_enabled(model, True)
    for h in hooks:
        h.remove()
    hmat = _sylvester(128) if block is None else torch.block_diag(*[_sylvester(block)] * (128 // block))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    expected, full_on = [], []
    for i in (0, 1):
        w = model.model.layers[i].mlp.down_proj.weight.detach().double()
        err_off = _ref_err(w).sum().item()
        err_on = _ref_err(w @ hmat).sum().item()
        err_full = _ref_err(w @ _sylvester(128)).sum().item()
        for x, b in zip(xs[i], batches, strict=True):
            keep = b["attention_mask"].bool()
            x = x.double()[keep]
            err_off += _ref_err(x).sum().item() / tokens
            err_on += _ref_err(x @ hmat).sum().item() / tokens
            err_full += _ref_err(x @ _sylvester(128)).sum().item() / tokens
        expected.append((err_off, err_on))
        full_on.append(err_full)
    if block is None:  # the plant works as intended: rotation clearly helps layer 0 and clearly hurts layer 1
        assert expected[0][1] < 0.7 * expected[0][0], expected
        assert expected[1][1] > 1.3 * expected[1][0], expected
    # the full-size R4 gives clearly different errors, so matching `expected` checks the block R4 itself
    assert block is None or abs(full_on[0] - expected[0][1]) > 0.05 * expected[0][1]

    result = search_rotation_config(model, batches)
    assert [f["R4"] for f in result.layers] == [e[1] < e[0] for e in expected]
    assert all(not f["R2"] and not f["R3"] for f in result.layers)  # not allowed
    for i in (0, 1):
        got = result.errors[i]["R4"]
        assert got == pytest.approx(expected[i], rel=1e-3)
        assert set(result.errors[i]) == {"R4"}
    t = result.totals
    assert t["chosen"] <= t["off"] and t["chosen"] <= t["on"]
    assert t["chosen"] == pytest.approx(sum(min(e) for e in expected), rel=1e-3)
    assert [f["R4"] for f in get_state(model).applied["layers"]] == [e[1] < e[0] for e in expected]
    rc = model.config.quantization_config.rotation_config
    assert rc["strategy"] == "adaptive" and rc["criterion"] == "paper"
    assert rc["errors"][0]["R4"] == list(result.errors[0]["R4"])


@pytest.mark.parametrize("criterion", ["paper", "output"])
def test_decision_follows_errors_and_matches_two_real_passes(tiny_checkpoints, criterion):
    """The single-pass measurement equals measuring with the model really all off / all on."""
    batches = _batches()
    model = _load(tiny_checkpoints["qwen2"])
    off = search_rotation_config(model, batches, criterion=criterion, apply=False)
    set_rotation_config(model, _flags(model, R2=True, R3=True, R4=True), record=False)
    on = search_rotation_config(model, batches, criterion=criterion, apply=False)
    for e_off, e_on in zip(off.errors, on.errors, strict=True):
        for name in ALL:
            assert e_off[name] == pytest.approx(e_on[name], rel=2e-3)
    for flags, errs in zip(off.layers, off.errors, strict=True):
        for name in ALL:
            assert flags[name] == (errs[name][1] < errs[name][0])
    t = off.totals
    assert t["chosen"] <= min(t["off"], t["on"]) + 1e-12


# ---------------------------------------------------------------- padding and determinism
def _pad_right(batch, extra, pad_id=7):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    ids = torch.cat([ids, torch.full((b, extra), pad_id)], 1)
    mask = torch.cat([mask, torch.zeros(b, extra, dtype=mask.dtype)], 1)
    # one extra row that is all padding
    ids = torch.cat([ids, torch.full((1, ids.shape[1]), pad_id)], 0)
    mask = torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=mask.dtype)], 0)
    return {"input_ids": ids, "attention_mask": mask}


def _to_left(batch, pad_id=7):
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        ids[r] = torch.cat([torch.full((ids.shape[1] - n,), pad_id), batch["input_ids"][r, :n]])
        mask[r] = torch.cat([torch.zeros(ids.shape[1] - n, dtype=mask.dtype), torch.ones(n, dtype=mask.dtype)])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("criterion", ["paper", "output"])
def test_padding_does_not_change_errors_or_decision(tiny_checkpoints, criterion):
    batches = _batches()
    model = _load(tiny_checkpoints["llama"])
    ref = search_rotation_config(model, batches, criterion=criterion, apply=False)
    padded = search_rotation_config(model, [_pad_right(b, 6) for b in batches], criterion=criterion, apply=False)
    left = search_rotation_config(model, [_to_left(b) for b in batches], criterion=criterion, apply=False)
    for other in (padded, left):
        assert other.layers == ref.layers
        assert other.tokens == ref.tokens
        for a, b in zip(ref.errors, other.errors, strict=True):
            for name in ALL:
                assert a[name] == pytest.approx(b[name], rel=1e-3)


def test_calibration_sampling_is_deterministic():
    data = _data(50)
    a = sample_calibration_batches(data, 20, seed=3, batch_size=6)
    b = sample_calibration_batches(data, 20, seed=3, batch_size=6)
    c = sample_calibration_batches(data, 20, seed=4, batch_size=6)
    assert len(a) == 4 and sum(x["input_ids"].shape[0] for x in a) == 20
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
               for x, y in zip(a, b, strict=True))
    assert not all(x["input_ids"].shape == y["input_ids"].shape and torch.equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(a, c, strict=True))
    # real tokens of each row are the drawn example, right-padded
    for batch in a:
        lengths = batch["attention_mask"].sum(1)
        assert all(batch["attention_mask"][r, : int(n)].all() for r, n in enumerate(lengths))
    # rank sharding splits one draw without overlap
    shards = [sample_calibration_batches(data, 20, seed=3, batch_size=6, rank=r, world_size=2) for r in (0, 1)]
    assert sum(x["input_ids"].shape[0] for s in shards for x in s) == 20
    with pytest.raises(ValueError, match="empty calibration data"):
        sample_calibration_batches([], 4)
    with pytest.raises(ValueError, match="pass tokenizer="):
        sample_calibration_batches(["some text"], 1)


def test_search_is_deterministic(tiny_checkpoints):
    results = []
    for _ in range(2):
        model = _load(tiny_checkpoints["gpt_neox"])
        results.append(search_rotation_config(model, _batches(seed=5), criterion="output"))
    assert results[0].rotation_config == results[1].rotation_config


# ---------------------------------------------------------------- function, round trips, layerwise
def test_search_preserves_function_and_round_trips(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))
    model = _load(path, rotation_search="adaptive")
    set_quantization_enabled(model, False)
    with torch.no_grad():
        before = model(ids).logits
    set_quantization_enabled(model, True)
    result = search_rotation_config(model, _batches())
    assert get_state(model).searched
    set_quantization_enabled(model, False)
    with torch.no_grad():
        after = model(ids).logits
    assert float((before - after).abs().max() / before.abs().max()) <= 1e-4
    set_quantization_enabled(model, True)
    with torch.no_grad():
        trained = model(ids).logits
    # JSON round trip of the config
    cfg = model.config.quantization_config
    again = RoSTEConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.rotation_config == cfg.rotation_config
    assert again.rotation_config["errors"] == [{k: list(v) for k, v in e.items()} for e in result.errors]
    # deployed: a fresh full-precision load with the recorded configuration computes the same
    deployed = _load(path, rotation_search="adaptive", rotation_config=cfg.rotation_config)
    with torch.no_grad():
        assert torch.allclose(deployed(ids).logits, trained, atol=1e-4, rtol=1e-4)
    # save / load of the master checkpoint keeps flags and errors
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    rc = reloaded.config.quantization_config.rotation_config
    assert rc["layers"] == result.layers and rc["errors"] == cfg.rotation_config["errors"]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained, atol=1e-4, rtol=1e-4)


def test_layerwise_reports_extremes_and_never_worse_than_adaptive(tiny_checkpoints):
    model = _load(tiny_checkpoints["mistral"])
    batches = _batches(n=8)
    adaptive = search_rotation_config(model, batches, apply=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = search_rotation_config(model, batches, strategy="layerwise", apply=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # apply=False leaves weights untouched
    w = result.whole_model
    assert set(w) == {"all_off", "all_on", "adaptive", "final"}
    assert w["final"] <= w["adaptive"]
    assert all(math.isfinite(v) and v >= 0 for v in w.values())
    assert result.errors == adaptive.errors
    md = result.to_markdown()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 3 and "Whole-model KL" in md
    applied = search_rotation_config(model, batches, strategy="layerwise")
    assert applied.layers == result.layers
    assert model.config.quantization_config.rotation_config["strategy"] == "layerwise"


# ---------------------------------------------------------------- optimizer state on re-search
def _grad_step(model, opt, batch):
    opt.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
    out.loss.backward()
    opt.step()


def test_optimizer_moments_follow_a_switch(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    batch = _batches(n=4)[0]
    target = {"R1": True, "layers": [{"R2": True, "R3": True, "R4": True}, {"R2": False, "R3": False, "R4": True}]}

    def run(flags):
        m = _load(path)
        set_rotation_config(m, flags, record=False)
        set_quantization_enabled(m, False)
        opt = torch.optim.AdamW(m.parameters(), lr=0.0)
        for _ in range(2):
            _grad_step(m, opt, batch)
        return m, opt

    model_a, opt_a = run({"R1": True, "layers": [dict.fromkeys(ALL, False)] * 2})
    ref_b, opt_b = run(target)
    old = get_state(model_a).applied
    set_rotation_config(model_a, target, record=False)
    done = rotate_optimizer_state(opt_a, model_a, old, target)
    assert done == ["layer 0 R4 on", "layer 0 R2 on", "layer 1 R4 on"]
    for (name, p_a), p_b in zip(model_a.named_parameters(), ref_b.parameters(), strict=True):
        s_a, s_b = opt_a.state[p_a], opt_b.state[p_b]
        assert torch.allclose(p_a, p_b, atol=1e-5), name
        # first moment: exactly the EMA of the gradients in the new parametrisation
        assert torch.allclose(s_a["exp_avg"], s_b["exp_avg"], atol=1e-6, rtol=1e-4), name
        # second moment: positive, trace kept
        assert (s_a["exp_avg_sq"] >= 0).all()
        assert torch.allclose(s_a["exp_avg_sq"].sum(), s_b["exp_avg_sq"].sum(), rtol=0.5), name
    down = model_a.model.layers[1].mlp.down_proj.weight
    v = opt_a.state[down]["exp_avg_sq"]
    assert torch.allclose(v, v.mean(1, keepdim=True).expand_as(v))
    # training continues
    for g in opt_a.param_groups:
        g["lr"] = 1e-3
    set_quantization_enabled(model_a, True)
    _grad_step(model_a, opt_a, batch)
    assert all(torch.isfinite(p).all() for p in model_a.parameters())


def test_search_rotates_optimizer_state_it_is_given(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = _batches(n=4)
    _grad_step(model, opt, batches[0])
    down = model.model.layers[0].mlp.down_proj
    m_before = opt.state[down.weight]["exp_avg"].clone()
    result = search_rotation_config(model, batches, optimizer=opt)
    m_after = opt.state[down.weight]["exp_avg"]
    assert torch.equal(m_before, m_after) != result.layers[0]["R4"]


# ---------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match="no calibration batches"):
        search_rotation_config(model, [])
    with pytest.raises(ValueError, match="has no 'attention_mask'"):
        search_rotation_config(model, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="shaped like input_ids"):
        search_rotation_config(model, [{"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                        "attention_mask": torch.ones(1, 3)}])
    with pytest.raises(ValueError, match="strategy='greedy' is invalid"):
        search_rotation_config(model, _batches(n=4), strategy="greedy")
    with pytest.raises(ValueError, match="criterion='mse' is invalid"):
        search_rotation_config(model, _batches(n=4), criterion="mse")
    with pytest.raises(ValueError, match="was not prepared for RoSTE"):
        search_rotation_config(build_tiny("llama"), _batches(n=4))
