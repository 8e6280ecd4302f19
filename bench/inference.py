"""Inference of a packed RoSTE W4A4KV4 model against the same model in fp32 and bf16.

Model: a randomly initialised Llama of ~135M parameters (hidden 768, 12 layers, 12 heads of 64,
vocab 32000, intermediate 2048 by Llama's own sizing rule ``256 * ceil(8 * hidden / 3 / 256)``;
85M parameters in the quantized linears), all rotations on. One process, 2 threads, interleaved
repetitions, medians with min-max spread. Figures:

- checkpoint bytes per quantized-linear parameter (codes + scales + zero points) and whole
  checkpoint sizes;
- resident memory of the loaded model (RSS growth of a fresh process after loading and one forward,
  which builds the packed model's kernel layouts), packed loaded in fp32 vs fp32 and packed loaded
  in bf16 (embeddings, norms and head in bf16) vs bf16;
- prefill throughput at batch 8 x 256 (no cache) and decode tokens/s at batch 1 (greedy, cache on),
  timed in a fresh process with glibc's default allocator (the headline figures) and again in one
  with ``TUNED_MALLOC`` (freed large blocks stay in the heap: no page faults for each fresh multi-MB
  temporary; applies to every variant, the usual CPU-inference tuning, like jemalloc / tcmalloc);
- KV cache bytes per cached token (the packed model's quantized cache vs a bf16 DynamicCache), also
  the bytes allocated including the cache's growth reserve;
- the online R4 Hadamard's cost at prefill relative to the fp32 down_proj GEMM it precedes, for a
  power-of-two intermediate size and for 3072 (= 192 x 16: compressed-tensors' dense order-192
  factor, ~192 multiply-adds per element; real models such as 14336 = 224 x 64 are in this case).

Last output line: JSON with `bytes_per_linear_param`, `prefill_speedup_vs_fp32`,
`decode_speedup_vs_fp32`, `kv_bytes_ratio_vs_bf16` and the rest.

    python bench/inference.py [--quick] [--intermediate N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import emit, interleaved, ratio  # noqa: E402

SHAPES = {
    "full": dict(hidden=768, layers=12, heads=12, inter=2048, vocab=32000, prefill=(8, 256), prompt=32, new=32),
    "quick": dict(hidden=256, layers=2, heads=4, inter=768, vocab=4096, prefill=(2, 64), prompt=8, new=8),
}


def build_checkpoints(shape: dict, root: str) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_roste  # noqa: F401
    from hf_roste import RoSTEConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      vocab_size=shape["vocab"], max_position_embeddings=2048)
    paths = {k: os.path.join(root, k) for k in ("fp32", "bf16", "packed", "packed-bf16")}
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(paths["fp32"])
    model.to(torch.bfloat16).save_pretrained(paths["bf16"])
    qat = AutoModelForCausalLM.from_pretrained(paths["fp32"], quantization_config=RoSTEConfig(rotation_search="all"),
                                               dtype=torch.float32)
    qat.save_pretrained(paths["packed"])
    # the same packed model with its non-quantized tensors (embeddings, norms, head) stored in bf16
    load(paths["packed"], "packed-bf16").save_pretrained(paths["packed-bf16"])
    return paths


def load(path: str, variant: str):
    """``variant``: fp32 / bf16 / packed (fp32 non-quantized parts) / packed-bf16."""
    from transformers import AutoModelForCausalLM

    import hf_roste  # noqa: F401

    dtype = torch.bfloat16 if variant in ("bf16", "packed-bf16") else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def linear_bytes_per_param(packed_model) -> float:
    """Stored bytes (codes + scales + zero points) per parameter of the packed linears."""
    from hf_roste.modules.packed_linear import PackedLinear

    stored, params = 0, 0
    for module in packed_model.modules():
        if isinstance(module, PackedLinear):
            params += module.in_features * module.out_features
            for t in (module.weight_packed, module.weight_scale, module.weight_zero_point):
                stored += t.numel() * t.element_size()
    return stored / params


def resident_bytes(paths: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Per variant (name -> checkpoint): RSS growth of a fresh process from before loading to after
    loading and one forward; and the same after ``gc.collect()`` + glibc ``malloc_trim(0)`` (freed heap
    pages returned to the OS, i.e. without the loader's and kernel builder's transient allocations;
    equal to the first off glibc).  The processes run concurrently (each RSS is its own)."""
    code = (
        f"import sys, gc, ctypes, torch; sys.path.insert(0, {ROOT!r}); torch.set_num_threads(2);"
        "import hf_roste, transformers;"
        "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024;"
        "before = rss(); from bench.inference import load;"
        "m = load(sys.argv[1], sys.argv[2]);"
        "m(torch.zeros(1, 8, dtype=torch.long));"
        "grown = rss() - before; gc.collect();\n"
        "try:\n ctypes.CDLL('libc.so.6').malloc_trim(0)\nexcept OSError:\n pass\n"
        "print(grown, rss() - before)"
    )
    procs = {v: subprocess.Popen([sys.executable, "-c", code, p, v], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for v, p in paths.items()}
    out = {}
    for v, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"resident-memory child for {v!r} failed:\n{stderr[-2000:]}")
        grown, trimmed = stdout.strip().splitlines()[-1].split()
        out[v] = (int(grown), int(trimmed))
    return out


def kv_bytes_per_token(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """(stored, allocated) KV bytes per cached token after generating ``new`` tokens."""
    from hf_roste.modules.kv_cache import cache_bytes_per_token
    from hf_roste.modules.kv_cache_wiring import output_cache

    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True)
    cache = output_cache(out)
    stored = cache_bytes_per_token(cache)
    allocated = sum(getattr(layer, "allocated_nbytes", 0) for layer in cache.layers)
    tokens = cache.get_seq_length() * prompt.shape[0]
    return stored, (allocated / tokens if allocated else stored)


def r4_cost(hidden: int, sizes: tuple[int, ...], rows: int, reps: int) -> dict[str, float]:
    """Median time of the online R4 transform of ``[rows, n]`` / the fp32 down_proj GEMM ``n -> hidden``."""
    from bench._common import interleaved
    from hf_roste.numerics.hadamard import hadamard_factorization, hadamard_transform

    out = {}
    for n in sizes:
        x, w = torch.randn(rows, n), torch.randn(hidden, n)
        st = interleaved({"r4": lambda x=x: hadamard_transform(x),
                          "gemm": lambda x=x, w=w: torch.nn.functional.linear(x, w)}, reps=reps)
        m, k = hadamard_factorization(n)
        out[f"{n}=({m}x2^{k})"] = st["r4"]["median"] / st["gemm"]["median"]
    return out


# glibc malloc settings that keep freed large blocks in the heap instead of returning them to the OS
# (each fresh multi-MB temporary otherwise costs page faults): the usual CPU-inference tuning
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
                "MALLOC_TOP_PAD_": str(2**28)}


def inputs(shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, s = shape["prefill"]
    return (torch.randint(0, shape["vocab"], (b, s), generator=g),
            torch.randint(0, shape["vocab"], (1, shape["prompt"]), generator=g))


def timing(paths: dict[str, str], shape: dict, reps: int) -> dict:
    """Interleaved prefill and decode timings of fp32 / bf16 / packed in this process."""
    models = {v: load(paths[v], v) for v in ("fp32", "bf16", "packed")}
    prefill_ids, prompt = inputs(shape)

    def prefill(m):
        def run():
            with torch.no_grad():
                m(prefill_ids, use_cache=False)
        return run

    def decode(m):
        def run():
            m.generate(prompt, max_new_tokens=shape["new"], min_new_tokens=shape["new"], do_sample=False)
        return run

    return {"prefill": interleaved({v: prefill(m) for v, m in models.items()}, reps=reps),
            "decode": interleaved({v: decode(m) for v, m in models.items()}, reps=reps)}


def timing_child(root: str, shape: dict, reps: int, env: dict[str, str]) -> dict:
    """:func:`timing` in a fresh process with extra environment variables (allocator settings)."""
    code = (f"import sys, json, torch; sys.path.insert(0, {ROOT!r}); torch.set_num_threads(2);"
            "from bench.inference import timing; import json;"
            f"print(json.dumps(timing(json.loads(sys.argv[1]), json.loads(sys.argv[2]), {reps})))")
    paths = {k: os.path.join(root, k) for k in ("fp32", "bf16", "packed")}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(paths), json.dumps(shape)], capture_output=True,
                         text=True, env=dict(os.environ, **env))
    if out.returncode:
        raise RuntimeError(f"timing child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=None, help="override the MLP width (e.g. 3072)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = dict(SHAPES["quick" if args.quick else "full"])
    if args.intermediate:
        shape["inter"] = args.intermediate
    reps = args.reps or (2 if args.quick else 5)
    b, s = shape["prefill"]
    with tempfile.TemporaryDirectory() as root:
        paths = build_checkpoints(shape, root)
        # timings in fresh processes, one after the other: glibc defaults, then the tuned allocator
        timed = {"default": timing_child(root, shape, reps, {}), "tuned": timing_child(root, shape, reps, TUNED_MALLOC)}
        pre, dec = timed["default"]["prefill"], timed["default"]["decode"]
        _, prompt = inputs(shape)
        models = {v: load(paths[v], v) for v in ("bf16", "packed")}
        kv = {v: kv_bytes_per_token(m, prompt, shape["new"]) for v, m in models.items()}
        sizes = {v: checkpoint_bytes(p) for v, p in paths.items()}
        bpp = linear_bytes_per_param(models["packed"])
        del models
        rss = resident_bytes(paths)
    r4 = r4_cost(shape["hidden"], (shape["inter"], 3072) if shape["inter"] != 3072 else (3072,),
                 rows=b * s, reps=3 if args.quick else 5)
    tokens_prefill, tokens_decode = b * s, shape["new"]
    print(f"model: {shape}, threads 2, repetitions {reps}")
    print(f"checkpoint: fp32 {sizes['fp32'] / 2**20:.1f} MiB, bf16 {sizes['bf16'] / 2**20:.1f} MiB, "
          f"packed {sizes['packed'] / 2**20:.1f} MiB (non-quantized tensors fp32), {sizes['packed-bf16'] / 2**20:.1f} MiB "
          f"(bf16); quantized linears: {bpp:.4f} bytes/param (target <= 0.53)")
    for i, what in enumerate(("after load + 1 forward", "same, freed heap returned (malloc_trim)")):
        print(f"resident {what}: fp32 {rss['fp32'][i] / 2**20:.0f} MiB, bf16 {rss['bf16'][i] / 2**20:.0f} MiB, "
              f"packed {rss['packed'][i] / 2**20:.0f} MiB (rest fp32), {rss['packed-bf16'][i] / 2**20:.0f} MiB (rest bf16)")
    for name, st, toks in (("prefill", pre, tokens_prefill), ("decode", dec, tokens_decode)):
        for v in ("fp32", "bf16", "packed"):
            m = st[v]
            print(f"  {name:7s} {v:6s}: {toks / m['median']:9.1f} tok/s  (median {m['median'] * 1e3:.1f} ms, "
                  f"min {m['min'] * 1e3:.1f}, max {m['max'] * 1e3:.1f})")
    pr_fp32, pr_bf16 = ratio(pre, "fp32", "packed"), ratio(pre, "bf16", "packed")
    de_fp32, de_bf16 = ratio(dec, "fp32", "packed"), ratio(dec, "bf16", "packed")
    tpre, tdec = timed["tuned"]["prefill"], timed["tuned"]["decode"]
    tpr_fp32, tde_fp32 = ratio(tpre, "fp32", "packed"), ratio(tdec, "fp32", "packed")
    print(f"  prefill speed-up vs fp32 {pr_fp32['median']:.2f}x (target >= 1.5), vs bf16 {pr_bf16['median']:.2f}x")
    print(f"  decode  speed-up vs fp32 {de_fp32['median']:.2f}x (target >= 1.2), vs bf16 {de_bf16['median']:.2f}x")
    print(f"  with the tuned allocator ({', '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())}), all variants: "
          f"prefill vs fp32 {tpr_fp32['median']:.2f}x (spread {tpr_fp32['min']:.2f}-{tpr_fp32['max']:.2f}), "
          f"decode vs fp32 {tde_fp32['median']:.2f}x (spread {tde_fp32['min']:.2f}-{tde_fp32['max']:.2f}); "
          f"fp32 prefill {tpre['fp32']['median'] / pre['fp32']['median']:.2f}x the default-allocator time")
    kv_ratio = kv["packed"][0] / kv["bf16"][0]
    print(f"KV cache: bf16 {kv['bf16'][0]:.0f} B/token, packed {kv['packed'][0]:.0f} B/token stored ({kv_ratio:.3f}x; "
          f"target <= 0.3), {kv['packed'][1]:.0f} B/token allocated with the growth reserve")
    print("online R4 at prefill / fp32 down_proj GEMM: " + ", ".join(f"n={k}: {v:.3f}" for k, v in r4.items()))
    from hf_roste.numerics.onednn import INT8_KERNEL_ENV, onednn_int8_enabled

    kernel = "onednn" if onednn_int8_enabled() else "int_mm"
    print(f"CPU int8 GEMM route: {kernel} ({INT8_KERNEL_ENV}={os.environ.get(INT8_KERNEL_ENV, 'auto')})")
    emit({
        "int8_kernel": kernel, "int8_kernel_setting": os.environ.get(INT8_KERNEL_ENV, "auto"),
        "bytes_per_linear_param": bpp,
        "checkpoint_ratio_vs_fp32": sizes["packed"] / sizes["fp32"],
        "checkpoint_ratio_vs_bf16": sizes["packed-bf16"] / sizes["bf16"],
        "checkpoint_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
        "resident_ratio_vs_fp32": rss["packed"][0] / rss["fp32"][0],
        "resident_ratio_vs_bf16": rss["packed-bf16"][0] / rss["bf16"][0],
        "resident_trimmed_ratio_vs_fp32": rss["packed"][1] / rss["fp32"][1],
        "resident_trimmed_ratio_vs_bf16": rss["packed-bf16"][1] / rss["bf16"][1],
        "resident_mib": {k: round(v[0] / 2**20, 1) for k, v in rss.items()},
        "resident_trimmed_mib": {k: round(v[1] / 2**20, 1) for k, v in rss.items()},
        "prefill_speedup_vs_fp32": pr_fp32["median"], "prefill_speedup_vs_fp32_min": pr_fp32["min"],
        "prefill_speedup_vs_fp32_max": pr_fp32["max"], "prefill_speedup_vs_bf16": pr_bf16["median"],
        "decode_speedup_vs_fp32": de_fp32["median"], "decode_speedup_vs_fp32_min": de_fp32["min"],
        "decode_speedup_vs_fp32_max": de_fp32["max"], "decode_speedup_vs_bf16": de_bf16["median"],
        "tuned_malloc_prefill_speedup_vs_fp32": tpr_fp32["median"], "tuned_malloc_prefill_speedup_vs_fp32_min":
        tpr_fp32["min"], "tuned_malloc_prefill_speedup_vs_fp32_max": tpr_fp32["max"],
        "tuned_malloc_decode_speedup_vs_fp32": tde_fp32["median"], "tuned_malloc_decode_speedup_vs_fp32_min":
        tde_fp32["min"], "tuned_malloc_decode_speedup_vs_fp32_max": tde_fp32["max"], "tuned_malloc": TUNED_MALLOC,
        "kv_bytes_per_token_packed": kv["packed"][0], "kv_bytes_per_token_bf16": kv["bf16"][0],
        "kv_allocated_bytes_per_token_packed": kv["packed"][1],
        "kv_bytes_ratio_vs_bf16": kv_ratio, "shape": "quick" if args.quick else "full",
        "model": {k: shape[k] for k in ("hidden", "layers", "heads", "inter", "vocab")},
        "r4_over_down_proj_gemm": r4,
    })


if __name__ == "__main__":
    main()
