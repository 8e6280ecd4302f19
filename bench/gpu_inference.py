"""Packed W4A4KV4 inference on a CUDA GPU against the same model in bf16 (issue 19).

Models (random init, all rotations on, packed model's unquantized parts in bf16; ``--r4-block-size``
sets ``RoSTEConfig.r4_block_size``, default None: the full-size R4):

- ``0_5b``: the Qwen2.5-0.5B shape (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads,
  vocab 151936, q/k/v biases, tied embeddings);
- ``8b_width``: Llama-3.1-8B width with few layers (hidden 4096, intermediate 14336, 32 heads,
  8 KV heads, 4 layers, vocab 32000 so that the bf16 head does not hide the linears).

Per model, packed vs bf16, each both eager (HF ``generate`` defaults: dynamic cache; the packed model
uses its 4-bit ``RoSTEQuantizedCache``) and compiled (``torch.compile`` of ``forward``,
``cache_implementation="static"``; mode ``reduce-overhead``, i.e. CUDA graphs):

- prefill of 8 x 512 tokens (no cache), ms;
- decode ms/token at batch 1 and 16: ``(t(generate 1 + N tokens) - t(generate 1 token)) / N``;
- memory: bytes of the quantized linears (packed codes, scales, zero points and the kernel's
  per-layer extras) vs their bf16 weights; whole-model allocated memory after load; KV cache bytes
  at a 4096-token context of the caches the compiled runs use, ``cache_implementation="static"``
  (the packed model's ``RoSTEQuantizedStaticCache``: 4-bit codes, fp32 scales, int16 zero points, all
  slots allocated, vs transformers' bf16 ``StaticCache``), and of the eager runs' dynamic caches
  (``RoSTEQuantizedCache``, stored tokens, vs bf16 ``DynamicCache``).

Kernels of the packed model: per linear, the per-token activation quantizer and the packed int8 GEMM
(``packed_gemm.py``); for the down_proj's online R4, the fused rotate + quantize kernel
(``rotate_quant.py``) when the rotation is block-diagonal with a power-of-two block up to 8192 or full-size
with a power-of-two intermediate size up to 8192, else the Triton Hadamard kernel and then the quantizer
(the default full-size R4 at 4864 and 14336 takes that unfused route; ``--r4-block-size 128`` the fused
one); decode attention over the 4-bit cache (``kv_attention.py``).  The route taken is recorded per
model as ``r4_route_<model>``.

Timings are interleaved repetitions with medians (``bench/_common.py``), synchronised with the device.
A compiled variant that fails records its error in ``errors`` and null figures instead of stopping
the run.  Last output line: JSON with ``prefill_speedup_vs_bf16_8b_width``,
``decode_speedup_vs_bf16_8b_width``, ``prefill_speedup_vs_bf16_0_5b``, ``decode_speedup_vs_bf16_0_5b``
(compiled, static cache, batch 1 for decode), their ``_eager`` twins, the batch-16 decode figures,
``weight_memory_ratio_vs_bf16``, ``kv_memory_ratio_vs_bf16`` (static caches, as the compiled runs),
``kv_memory_ratio_vs_bf16_dynamic`` (the eager runs' caches) and ``gpu``.

Without a CUDA device it prints ``{"skipped": "no CUDA device"}`` and exits 0.  ``--dry`` runs the
whole script on tiny shapes on the CPU (compiled variants with the ``aot_eager`` backend): it checks
the plumbing, its timings mean nothing.

    python bench/gpu_inference.py [--dry] [--reps N] [--only 0_5b|8b_width] [--r4-block-size B]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import emit, interleaved  # noqa: E402

SHAPES = {
    "0_5b": dict(family="qwen2", hidden=896, inter=4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    "8b_width": dict(family="llama", hidden=4096, inter=14336, layers=4, heads=32, kv_heads=8, vocab=32000),
}
FULL = dict(prefill=(8, 512), decode_batches=(1, 16), prompt=16, new=64, context=4096)
DRY_SHAPES = {
    "0_5b": dict(family="qwen2", hidden=64, inter=160, layers=2, heads=4, kv_heads=2, vocab=128),
    "8b_width": dict(family="llama", hidden=128, inter=256, layers=2, heads=2, kv_heads=1, vocab=128),
}
DRY = dict(prefill=(2, 16), decode_batches=(1, 2), prompt=4, new=3, context=64)


def _config(shape: dict):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  vocab_size=shape["vocab"], max_position_embeddings=8192)
    if shape["family"] == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(**common)


def build(shape: dict, root: str, device: str, r4_block: int | None = None) -> dict[str, str]:
    """Save the bf16 model and its packed RoSTE (W4A4KV4, all rotations, R4 in blocks of ``r4_block``)
    twin; return their paths."""
    from transformers import AutoModelForCausalLM

    from hf_roste import RoSTEConfig

    torch.manual_seed(0)
    paths = {k: os.path.join(root, k) for k in ("bf16", "fp32", "packed")}
    model = AutoModelForCausalLM.from_config(_config(shape), dtype=torch.float32)
    model.save_pretrained(paths["fp32"])
    model.to(torch.bfloat16).save_pretrained(paths["bf16"])
    del model
    config = RoSTEConfig(rotation_search="all", r4_block_size=r4_block)
    qat = AutoModelForCausalLM.from_pretrained(paths["fp32"], quantization_config=config,
                                               dtype=torch.float32, device_map=device)
    qat.save_pretrained(paths["packed"])
    return paths


def load(path: str, device: str):
    from transformers import AutoModelForCausalLM

    import hf_roste  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device,
                                                attn_implementation="sdpa").eval()


def r4_route(model) -> str:
    """Which kernels apply the down_projs' online R4 on the Triton route (the first layer's; all alike)."""
    from hf_roste.modules.packed_linear import fused_r4_block

    down = model.model.layers[0].mlp.down_proj
    if down.input_transform is None:
        return "none (no R4)"
    block = fused_r4_block(down.input_transform, down.in_features)
    if block is None:
        return "unfused: Triton Hadamard kernel, then the activation quantizer"
    return f"fused rotate + quantize kernel, Hadamard block {block}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def quantized_linear_bytes(model) -> tuple[int, int]:
    """(bytes held for the packed linears incl. kernel extras, bf16 bytes of the same weights)."""
    from hf_roste.modules.packed_linear import PackedLinear
    from hf_roste.numerics.int_matmul import IntWeight
    from hf_roste.numerics.kernels.packed_gemm import PackedWeight

    held, bf16 = 0, 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            bf16 += 2 * module.in_features * module.out_features
            tensors = [module.weight_packed, module.weight_scale, module.weight_zero_point]
            cache = module._cache
            if isinstance(cache, PackedWeight):  # the Triton layout (packed bytes shared)
                tensors += [cache.zero, cache.colsum]
            elif isinstance(cache, IntWeight):  # the PyTorch int8 layout (CPU, or HF_ROSTE_TRITON=0)
                held += cache.nbytes
            held += sum(t.numel() * t.element_size() for t in tensors)
    return held, bf16


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def kv_bytes(model, context: int, device: str, static: bool) -> tuple[int, str]:
    """(KV cache bytes, cache class name) after generating one token from a ``context - 1``-token prompt
    (batch 1), with ``generate``'s default cache or, ``static``, with ``cache_implementation="static"``."""
    from hf_roste.modules.kv_cache_wiring import QUANTIZED_KV_CACHES, output_cache

    ids = torch.randint(0, model.config.vocab_size, (1, context - 1), device=device)
    extra = dict(cache_implementation="static") if static else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                             do_sample=False, return_dict_in_generate=True, **extra)
    cache = output_cache(out)
    if isinstance(cache, QUANTIZED_KV_CACHES):  # codes, scales and zero points (static: every allocated slot)
        return int(cache.nbytes), type(cache).__name__
    nbytes = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in cache.layers)
    return nbytes, type(cache).__name__


def _compile(model, device: str) -> None:
    if device == "cuda":
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
    else:  # --dry: trace every graph without inductor's slow CPU codegen
        model.forward = torch.compile(model.forward, backend="aot_eager")


def timings(models: dict, run: dict, device: str, reps: int, static: bool) -> dict:
    """Interleaved prefill and decode timings (seconds) of the loaded models."""
    b, s = run["prefill"]
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (b, s), generator=g).to(device)
    extra = dict(cache_implementation="static") if static else {}

    def prefill(m):
        def go():
            with torch.no_grad():
                m(prefill_ids, use_cache=False)
            _sync(device)
        return go

    def gen(m, prompt, n):
        def go():
            with torch.no_grad():
                m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, **extra)
            _sync(device)
        return go

    out = {"prefill": interleaved({k: prefill(m) for k, m in models.items()}, reps=reps, warmup=2)}
    for batch in run["decode_batches"]:
        prompt = torch.randint(0, vocab, (batch, run["prompt"]), generator=g).to(device)
        long = interleaved({k: gen(m, prompt, 1 + run["new"]) for k, m in models.items()}, reps=reps, warmup=2)
        short = interleaved({k: gen(m, prompt, 1) for k, m in models.items()}, reps=reps, warmup=2)
        out[f"decode_b{batch}"] = {k: {"median": max(long[k]["median"] - short[k]["median"], 1e-9) / run["new"]}
                                   for k in models}
    return out


def measure(name: str, shape: dict, run: dict, device: str, reps: int, errors: list[str],
            r4_block: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        paths = build(shape, root, device, r4_block)
        print(f"[{name}] built bf16 + packed checkpoints in {time.perf_counter() - t0:.0f} s", flush=True)
        res: dict = {"shape": shape}
        for mode in ("eager", "compiled"):
            models = {"bf16": load(paths["bf16"], device), "packed": load(paths["packed"], device)}
            if mode == "eager":
                with torch.no_grad():  # builds the packed kernels' layouts before counting memory
                    models["packed"](torch.zeros(1, 8, dtype=torch.long, device=device))
                res["r4_route"] = r4_route(models["packed"])
                held, bf16 = quantized_linear_bytes(models["packed"])
                res["linear_bytes"] = {"packed": held, "bf16": bf16}
                res["model_bytes"] = {k: model_bytes(m) for k, m in models.items()}
                for key, static in (("kv_bytes", True), ("kv_bytes_dynamic", False)):
                    measured = {k: kv_bytes(m, run["context"], device, static) for k, m in models.items()}
                    res[key] = {k: nbytes for k, (nbytes, _) in measured.items()}
                    res[key.replace("bytes", "cache")] = {k: name for k, (_, name) in measured.items()}
            try:
                if mode == "compiled":
                    for m in models.values():
                        with torch.no_grad():  # eager call first: packed layers build their kernel layouts
                            m(torch.zeros(1, 8, dtype=torch.long, device=device))
                        _compile(m, device)
                res[mode] = timings(models, run, device, reps, static=mode == "compiled")
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the other figures still count
                errors.append(f"{name} {mode}: {type(exc).__name__}: {exc}"[:500])
                traceback.print_exc()
                res[mode] = None
            del models
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
        return res


def _speedup(res: dict, mode: str, what: str) -> float | None:
    t = res.get(mode)
    if not t:
        return None
    return t[what]["bf16"]["median"] / t[what]["packed"]["median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (plumbing check)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--only", choices=sorted(SHAPES), default=None)
    parser.add_argument("--r4-block-size", type=int, default=None,
                        help="block-diagonal R4 (a power of two dividing the intermediate size, e.g. 128); "
                             "default: the full-size R4")
    args = parser.parse_args()
    if args.r4_block_size is not None:
        from hf_roste.numerics.block_hadamard import check_r4_block_size

        for name, shape in (DRY_SHAPES if args.dry else SHAPES).items():
            if args.only in (None, name):
                check_r4_block_size(args.r4_block_size, shape["inter"])
    if not args.dry and not torch.cuda.is_available():
        emit({"skipped": "no CUDA device"})
        return
    device = "cpu" if args.dry else "cuda"
    shapes, run = (DRY_SHAPES, DRY) if args.dry else (SHAPES, FULL)
    reps = args.reps or (2 if args.dry else 5)
    gpu = "none (--dry on cpu)" if args.dry else torch.cuda.get_device_name(0)
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    errors: list[str] = []
    results = {name: measure(name, shape, run, device, reps, errors, args.r4_block_size)
               for name, shape in shapes.items() if args.only in (None, name)}
    figures: dict = {"gpu": gpu, "torch": torch.__version__, "dry": args.dry, "errors": errors,
                     "r4_block_size": args.r4_block_size}
    b, s = run["prefill"]
    print(f"device: {gpu}; prefill {b} x {s}; decode {run['new']} tokens after a {run['prompt']}-token prompt; "
          f"repetitions {reps}")
    for name, res in results.items():
        print(f"[{name}] down_proj R4: {res['r4_route']}")
        figures[f"r4_route_{name}"] = res["r4_route"]
        for mode in ("eager", "compiled"):
            t = res.get(mode)
            if not t:
                print(f"[{name}] {mode}: failed (see errors)")
                continue
            for what, st in t.items():
                print(f"[{name}] {mode:8s} {what:10s} bf16 {st['bf16']['median'] * 1e3:8.2f} ms  "
                      f"packed {st['packed']['median'] * 1e3:8.2f} ms  speed-up {_speedup(res, mode, what) or 0:.2f}x")
        lin, mb, kv, kvd = res["linear_bytes"], res["model_bytes"], res["kv_bytes"], res["kv_bytes_dynamic"]
        print(f"[{name}] quantized linears {lin['packed'] / 2**20:.1f} MiB vs bf16 {lin['bf16'] / 2**20:.1f} MiB "
              f"({lin['packed'] / lin['bf16']:.3f}x); whole model {mb['packed'] / 2**20:.1f} vs {mb['bf16'] / 2**20:.1f} MiB")
        for label, sizes, caches in (("static", kv, res["kv_cache"]), ("dynamic", kvd, res["kv_cache_dynamic"])):
            print(f"[{name}] KV at {run['context']} tokens, {label} caches ({caches['packed']} vs {caches['bf16']}): "
                  f"{sizes['packed'] / 2**20:.2f} vs {sizes['bf16'] / 2**20:.2f} MiB ({sizes['packed'] / sizes['bf16']:.3f}x)")
        for mode, suffix in (("compiled", ""), ("eager", "_eager")):
            figures[f"prefill_speedup_vs_bf16_{name}{suffix}"] = _speedup(res, mode, "prefill")
            for batch in run["decode_batches"]:
                key = "decode" if batch == 1 else f"decode_b{batch}"
                figures[f"{key}_speedup_vs_bf16_{name}{suffix}"] = _speedup(res, mode, f"decode_b{batch}")
        figures[f"weight_memory_ratio_vs_bf16_{name}"] = lin["packed"] / lin["bf16"]
        figures[f"model_memory_ratio_vs_bf16_{name}"] = mb["packed"] / mb["bf16"]
        figures[f"kv_memory_ratio_vs_bf16_{name}"] = kv["packed"] / kv["bf16"]
        figures[f"kv_memory_ratio_vs_bf16_dynamic_{name}"] = kvd["packed"] / kvd["bf16"]
        figures[f"kv_cache_{name}"] = res["kv_cache"]
    names = list(results)
    figures["weight_memory_ratio_vs_bf16"] = max(figures[f"weight_memory_ratio_vs_bf16_{n}"] for n in names)
    figures["kv_memory_ratio_vs_bf16"] = max(figures[f"kv_memory_ratio_vs_bf16_{n}"] for n in names)
    figures["kv_memory_ratio_vs_bf16_dynamic"] = max(figures[f"kv_memory_ratio_vs_bf16_dynamic_{n}"] for n in names)
    emit(figures)


if __name__ == "__main__":
    main()
