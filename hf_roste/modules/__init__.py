"""The torch modules a RoSTE model is made of, for training and for deployment.

- :mod:`~hf_roste.modules.qat_linear`: `QATLinear`, the fake-quantized linear trained by QA-SFT
  (weights and input activations through the shared quantizer, optional online R4);
- :mod:`~hf_roste.modules.packed_linear`: `PackedLinear`, weights stored as packed low-bit codes,
  computed with the integer kernel of :mod:`hf_roste.numerics.int_matmul`;
- :mod:`~hf_roste.modules.shared_input`: one input quantization shared by q/k/v (gate/up);
- :mod:`~hf_roste.modules.attention`: R3 and K/V quantization inside transformers' attention;
- :mod:`~hf_roste.modules.kv_cache` / :mod:`~hf_roste.modules.kv_store` /
  :mod:`~hf_roste.modules.kv_cache_wiring`: `RoSTEQuantizedCache`, K/V stored as packed codes;
- :mod:`~hf_roste.modules.kv_static_cache`: `RoSTEQuantizedStaticCache`, its static-shape twin
  (preallocated code buffers for ``generate(cache_implementation="static")`` and torch.compile);
- :mod:`~hf_roste.modules.norm`: the RMSNorm LayerNorms become once R1 is fused.

They depend only on :mod:`hf_roste.numerics` and :mod:`hf_roste.state` (checked by tests/test_layering.py).
"""
