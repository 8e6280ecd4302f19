"""from_pretrained(..., quantization_config=RoSTEConfig(...)): function preservation and bad input."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from tiny_models import TINY_CONFIGS, build_tiny, sample_ids
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import hf_roste
from hf_roste import RoSTEConfig, get_state, set_rotation_config
from hf_roste.modules.qat_linear import QATLinear

FP = dict(weight_bits=16, activation_bits=16, kv_bits=16)


def _load(path, attn="eager", **cfg):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32, attn_implementation=attn
    ).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_all_rotations_preserve_function(tiny_checkpoints, kind, attn):
    path = tiny_checkpoints[kind]
    ids = sample_ids()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    model = _load(path, attn, rotation_search="all", **FP)
    state = get_state(model)
    assert state.applied["R1"] and all(all(f.values()) for f in state.applied["layers"])
    assert model.config._attn_implementation == f"roste_{attn}"
    with torch.no_grad():
        assert _rel_err(ref(ids).logits, model(ids).logits) <= 1e-4
    # the transformation really happened: weights differ from the original ones
    w_ref = ref.get_submodule(state.adapter.quantized_linear_paths(ref)[0]).weight
    w_new = model.get_submodule(state.adapter.quantized_linear_paths(model)[0]).weight
    assert not torch.allclose(w_ref, w_new, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox"])
def test_mixed_layer_flags_preserve_function(tiny_checkpoints, kind):
    path = tiny_checkpoints[kind]
    ids = sample_ids(seed=1)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    model = _load(path, rotation_search="none", **FP)
    combos = list(itertools.product([False, True], repeat=3))
    n = get_state(model).adapter.num_layers(model)
    for step, start in enumerate(range(0, len(combos), n)):
        flags = [dict(zip(("R2", "R3", "R4"), combos[(start + i) % len(combos)], strict=True)) for i in range(n)]
        set_rotation_config(model, {"R1": True, "layers": flags})
        assert model.config.quantization_config.rotation_config["layers"] == flags
        with torch.no_grad():
            assert _rel_err(ref_logits, model(ids).logits) <= 1e-4, (step, flags)
    # loading with an explicit rotation_config gives the same function too
    flags = [{"R2": True, "R3": False, "R4": True}, {"R2": False, "R3": True, "R4": False}]
    model2 = _load(path, rotation_config={"R1": True, "layers": flags}, **FP)
    assert get_state(model2).applied["layers"] == flags
    with torch.no_grad():
        assert _rel_err(ref_logits, model2(ids).logits) <= 1e-4


def test_without_r1_and_selected_rotations(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    ids = sample_ids()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = _load(path, rotations=("R3", "R4"), rotation_search="all", **FP)
    state = get_state(model)
    assert state.applied["R1"] is False
    assert all(f == {"R2": False, "R3": True, "R4": True} for f in state.applied["layers"])
    with torch.no_grad():
        assert _rel_err(ref(ids).logits, model(ids).logits) <= 1e-4


def test_default_adaptive_state_is_explicit(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"])
    state = get_state(model)
    assert model.config.quantization_config.rotation_config is None
    assert state.searched is False
    assert state.applied["R1"] is True
    assert all(f == {"R2": False, "R3": False, "R4": False} for f in state.applied["layers"])


def test_modules_are_swapped_and_lm_head_kept(tiny_checkpoints):
    model = _load(tiny_checkpoints["qwen2"])
    state = get_state(model)
    for path in state.adapter.quantized_linear_paths(model):
        assert isinstance(model.get_submodule(path), QATLinear), path
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    skip = _load(tiny_checkpoints["qwen2"], modules_to_not_convert=["down_proj"])
    assert type(skip.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(skip.model.layers[0].mlp.up_proj, QATLinear)


def test_import_twice_is_harmless():
    import importlib

    importlib.reload(hf_roste)
    importlib.reload(hf_roste)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["roste"].__name__ == "RoSTEHfQuantizer"


def test_real_model_configs_transform_on_meta(shared_model_configs):
    from hf_roste.convert import prepare_model

    for name, fields in shared_model_configs.items():
        from transformers import AutoConfig

        fields = {k: v for k, v in fields.items() if k not in ("architectures",)}
        config = AutoConfig.for_model(**fields)
        config.num_hidden_layers = 2  # shapes are what matter; two layers cover the layer loop
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        cfg = RoSTEConfig(rotation_search="all")
        model.config.quantization_config = cfg
        state = prepare_model(model, cfg, weights_are_rotated=False)
        assert all(all(f.values()) for f in state.applied["layers"]), name
        down = model.get_submodule(state.adapter.quantized_linear_paths(model)[-1])
        assert isinstance(down, QATLinear) and down.input_hadamard, name
        assert down.in_features == fields["intermediate_size"]


# ------------------------------------------------------------------ bad input
def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*Supported model types: llama, mistral, qwen2, qwen3, gpt_neox"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=RoSTEConfig())


def test_head_dim_without_hadamard_is_a_clear_error(tmp_path):
    from transformers import LlamaForCausalLM

    # head_dim 14 = 56 / 4 has no Hadamard construction
    LlamaForCausalLM(LlamaConfig(hidden_size=56, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"R2 needs a Hadamard matrix of order head_dim=14.*Remove 'R2'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=RoSTEConfig())
    # without the rotations that need it, the model loads
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=RoSTEConfig(rotations=("R4",), rotation_search="all")
    )
    assert get_state(model).applied["R1"] is False


def test_checkpoint_quantized_with_another_method_is_refused(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    data = json.loads(cfg_path.read_text())
    data["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {}}
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="CompressedTensorsConfig.*RoSTEConfig"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=RoSTEConfig())


def test_checkpoint_format_set_by_user_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="checkpoint_format='master' is set by hf_roste"):
        AutoModelForCausalLM.from_pretrained(
            tiny_checkpoints["llama"], quantization_config=RoSTEConfig(checkpoint_format="master")
        )


def test_set_rotation_config_rejects_bad_input(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"], rotations=("R1", "R3"))
    with pytest.raises(ValueError, match="has 1 layer entries but the model has 2 decoder layers"):
        set_rotation_config(model, {"R1": True, "layers": [{"R2": False, "R3": True, "R4": False}]})
    with pytest.raises(ValueError, match="turns R4 on but 'R4' is not in RoSTEConfig.rotations"):
        set_rotation_config(model, {"R1": True, "layers": [{"R2": False, "R3": False, "R4": True}] * 2})
    with pytest.raises(ValueError, match="R1.*cannot change"):
        set_rotation_config(model, {"R1": False, "layers": [{"R2": False, "R3": False, "R4": False}] * 2})
    with pytest.raises(ValueError, match="was not prepared for RoSTE"):
        set_rotation_config(build_tiny("llama"), {"R1": True, "layers": []})


def test_weight_group_size_not_dividing_a_layer_is_a_clear_error_at_load(tiny_checkpoints, monkeypatch):
    import hf_roste.convert as apply_mod

    path = tiny_checkpoints["llama_npow2_tied"]  # hidden 96, intermediate 160
    folded = []
    monkeypatch.setattr(apply_mod, "fold_norms", lambda *a, **k: folded.append(1))
    with pytest.raises(ValueError, match=r"weight_group_size=64 does not divide the input size of "
                                         r"model\.layers\.0\.self_attn\.q_proj \(in_features=96\).*divisor is 32"
                                         r".*e\.g\. 32.*weight_group_size=None"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(weight_group_size=64))
    assert not folded  # refused before the model was transformed
    # a group size dividing every quantized input size loads and quantizes per group
    model = _load(path, weight_group_size=32, rotation_search="all")
    lin = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(lin, QATLinear) and lin.weight_spec.group_size == 32
    with torch.no_grad():
        assert torch.isfinite(model(sample_ids()).logits).all()
    # unquantized weights need no groups; excluded modules are not checked
    _load(path, weight_group_size=64, weight_bits=16)
    with pytest.raises(ValueError, match=r"does not divide.*mlp\.down_proj \(in_features=160\)"):
        _load(path, weight_group_size=48)
    model = _load(path, weight_group_size=48, modules_to_not_convert=["down_proj", "lm_head"])
    assert type(model.get_submodule("model.layers.0.mlp.down_proj")) is torch.nn.Linear


def test_r4_on_an_unconverted_down_proj_is_refused_before_loading(tiny_checkpoints, monkeypatch):
    import hf_roste.convert as apply_mod

    path = tiny_checkpoints["llama"]
    folded = []
    monkeypatch.setattr(apply_mod, "fold_norms", lambda *a, **k: folded.append(1))
    skip = ["down_proj", "lm_head"]
    with pytest.raises(ValueError, match=r"R4 is switched on \(by rotation_search='all'\) for "
                                         r"model\.layers\.0\.mlp\.down_proj.*modules_to_not_convert.*'R4'"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(
            rotation_search="all", modules_to_not_convert=skip))
    only_layer_1 = {"R1": True, "layers": [{"R2": True, "R3": True, "R4": False}, {"R2": True, "R3": True, "R4": True}]}
    with pytest.raises(ValueError, match=r"\(by rotation_config\) for model\.layers\.1\.mlp\.down_proj"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(
            rotation_config=only_layer_1, modules_to_not_convert=["layers.1.mlp.down_proj", "lm_head"]))
    assert not folded
    monkeypatch.undo()
    # R4 off where the module is excluded, or not allowed at all: loads
    model = _load(path, rotation_config=only_layer_1, modules_to_not_convert=["layers.0.mlp.down_proj", "lm_head"])
    assert type(model.get_submodule("model.layers.0.mlp.down_proj")) is torch.nn.Linear
    _load(path, rotation_search="all", rotations=("R1", "R2", "R3"), modules_to_not_convert=skip)


def test_config_changed_after_construction_is_validated_at_load(tiny_checkpoints):
    cfg = RoSTEConfig()
    cfg.rotation_search = "ALL"  # bypasses RoSTEConfig.__init__'s checks
    with pytest.raises(ValueError, match=r"Invalid RoSTEConfig \(was a field changed after it was built\?\).*"
                                         r"rotation_search='ALL'"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=cfg)
    cfg = RoSTEConfig()
    cfg.update(modules_to_not_convert="down_proj")
    with pytest.raises(ValueError, match="modules_to_not_convert must be None or a list"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=cfg)


def test_gpt_neox_without_attention_bias_is_refused_before_loading(tmp_path, monkeypatch):
    from transformers import GPTNeoXConfig

    import hf_roste.convert as apply_mod

    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, rotary_pct=0.5, attention_bias=False, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "neox")
    folded = []
    monkeypatch.setattr(apply_mod, "fold_norms", lambda *a, **k: folded.append(1))
    with pytest.raises(ValueError, match=r"attention\.query_key_value has no bias but reads a LayerNorm with a bias"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "neox", quantization_config=RoSTEConfig())
    assert not folded


def test_api_arguments_are_type_checked(tiny_checkpoints):
    from hf_roste import search_rotation_config, set_quantization_enabled, set_rotation_config

    model = _load(tiny_checkpoints["llama"])
    with pytest.raises(TypeError, match="enabled must be True or False, got 'False'"):
        set_quantization_enabled(model, "False")
    with pytest.raises(TypeError, match="needs a dict"):
        set_rotation_config(model, None)
    ids = sample_ids()
    before = copy.deepcopy(get_state(model).applied)
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        search_rotation_config(model, batch, optimizer="adam")
    assert get_state(model).applied == before  # refused before anything was applied
    with pytest.raises(ValueError, match="attention_mask is all zeros"):
        search_rotation_config(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
