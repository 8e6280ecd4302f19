"""Adaptive rotation configuration search (RoSTE, method note section 4).

    from hf_roste import search_rotation_config
    result = search_rotation_config(model, calibration_batches, strategy="adaptive")

`strategy="adaptive"` is the paper: the per-layer quantization errors with every R2/R3/R4 off and
on are measured (see `search_stats` for the exact definitions and why one full-precision
calibration forward gives both), and per layer and type the setting with the lower error is kept
(ties keep the rotation off). `strategy="layerwise"` (beyond the paper) then evaluates the mixed
configuration as a whole, with quantization on, as the mean KL divergence per non-padding token
between the full-precision and the quantized next-token distributions, and tries, layer by layer
and type by type, the other setting, keeping a change only when that whole-model error drops. The
extremes (all off, all on) are evaluated too and reported.

The chosen configuration is applied with `set_rotation_config` (function-preserving fusion) and
recorded, with the errors, the criterion and the strategy, in
`model.config.quantization_config.rotation_config`, so it is saved with the model. The weights
touched while evaluating candidates are restored from a snapshot before the final configuration is
fused, so a bf16 model goes through exactly one switch per changed rotation.

Under `torch.distributed`, each rank measures its own calibration batches; error sums and token
counts are all-reduced before deciding, and rank 0's decision is broadcast, so every rank ends
with the identical configuration.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import logging

from ..config import PER_LAYER_ROTATIONS, SEARCH_ALGORITHMS, SEARCH_CRITERIA
from ..modules.qat_linear import QATLinear
from ..state import get_state, trained_lora_modules, unwrap_peft
from .fusion import set_rotation_config
from .search_result import RotationSearchResult, layer_table
from .search_stats import TYPE_INDEX, ErrorCollector

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------- input checks
def _check_batches(calibration_batches: Iterable[Mapping[str, Tensor]]) -> list[Mapping[str, Tensor]]:
    if calibration_batches is None:
        raise ValueError("search_rotation_config needs calibration batches, got None.")
    batches = list(calibration_batches)
    if not batches:
        raise ValueError(
            "search_rotation_config got no calibration batches; pass e.g. "
            "hf_roste.sample_calibration_batches(dataset, n_samples=128, tokenizer=tokenizer)."
        )
    for j, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"Calibration batch {j} must be a dict with 'input_ids' and 'attention_mask' tensors.")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"Calibration batch {j}: 'input_ids' must be a [batch, seq] tensor.")
        if mask is None:
            raise ValueError(
                f"Calibration batch {j} has no 'attention_mask'. The search sums errors over non-padding tokens "
                "only and needs the mask (use a collator that returns it, or sample_calibration_batches)."
            )
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"Calibration batch {j}: 'attention_mask' must be a tensor shaped like input_ids "
                             f"{tuple(ids.shape)}.")
    return batches


def _model_inputs(batch: Mapping[str, Tensor], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    valid = mask.bool()
    if "position_ids" in batch and batch["position_ids"] is not None:
        pos = batch["position_ids"].to(device)
    else:  # left and right padding give the same positions to the real tokens
        pos = (valid.long().cumsum(-1) - 1).clamp_(min=0)
    return {"input_ids": ids, "attention_mask": mask.long(), "position_ids": pos, "use_cache": False}, valid


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------- distributed
def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed if torch.distributed.get_world_size() > 1 else None
    return None


def _all_reduce(values: Tensor) -> Tensor:
    dist = _dist()
    if dist is None:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(buf)
    return buf.cpu()


def _broadcast(obj: Any) -> Any:
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


# --------------------------------------------------------------------------- model state helpers
class _QuantFlags:
    """Save / restore every RoSTE quantizer flag and the train/eval mode."""

    def __init__(self, model: nn.Module, state) -> None:
        self.model = model
        self.items = [(m, m.quant_enabled) for m in model.modules() if isinstance(m, QATLinear)]
        self.items += [(st, st.quant_enabled) for st in state.attention_states]
        self.training = model.training

    def set(self, enabled: bool) -> None:
        for obj, _ in self.items:
            obj.quant_enabled = enabled

    def restore(self) -> None:
        for obj, flag in self.items:
            obj.quant_enabled = flag
        self.model.train(self.training)


class _WeightSnapshot:
    """CPU copies of the parameters R2/R4 rewrite (v, o, down of every layer) and the flags."""

    def __init__(self, model: nn.Module, state) -> None:
        a = state.adapter
        v_path, _ = a.value_rows(model)
        params = {}
        for layer in a.decoder_layers(model):
            for path in (v_path, a.o_proj, a.down_proj):
                mod = a.get(layer, path)
                for p in (mod.weight, getattr(mod, "bias", None)):
                    if p is not None:
                        params[id(p)] = (p, p.detach().to("cpu", copy=True))
        self.params = list(params.values())
        self.downs = [(d, getattr(d, "input_hadamard", None)) for d in (a.get(ly, a.down_proj) for ly in a.decoder_layers(model))]
        self.applied = copy.deepcopy(state.applied)
        self.r3 = [st.r3 for st in state.attention_states]
        self.state = state

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.params:
            p.copy_(saved.to(p.device))  # not .data: bumps the version counter (quantized-weight caches)
        for d, flag in self.downs:
            if flag is not None:
                d.input_hadamard = flag
        for st, r3 in zip(self.state.attention_states, self.r3, strict=True):
            st.r3 = r3
        self.state.applied = copy.deepcopy(self.applied)


def _searchable(model: nn.Module, state) -> list[dict[str, bool]]:
    allowed = set(state.config.rotations)
    a = state.adapter
    out = []
    for layer in a.decoder_layers(model):
        down_ok = isinstance(a.get(layer, a.down_proj), QATLinear)
        out.append({"R2": "R2" in allowed, "R3": "R3" in allowed, "R4": "R4" in allowed and down_ok})
    return out


# --------------------------------------------------------------------------- passes
def _progress(batches, desc: str):
    from ..progress import progress

    return progress(batches, desc, unit="batch")


@torch.no_grad()
def _measure(model, state, batches, criterion, searchable, device, capture_final: bool):
    """One full-precision pass: error statistics (and the lm_head inputs of real tokens)."""
    finals: list[Tensor] = []
    lm_head = model.get_output_embeddings()
    collector = ErrorCollector(model, state, criterion, searchable)
    captured: dict[str, Tensor] = {}
    handle = lm_head.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0])) if capture_final else None
    tokens = 0
    try:
        with collector:
            for batch in _progress(batches, f"rotation search ({criterion})"):
                inputs, valid = _model_inputs(batch, device)
                collector.mask = valid.to(device)
                if not capture_final:
                    inputs["logits_to_keep"] = 1
                model(**inputs)
                tokens += int(valid.sum())
                if capture_final:
                    h = captured.pop("h")
                    finals.append(h[valid.to(h.device)].detach())
    finally:
        if handle is not None:
            handle.remove()
    collector.tokens = tokens
    return collector, finals


@torch.no_grad()
def _whole_model_error(model, batches, finals, device) -> float:
    """Mean KL(p_fp || p_quant) per non-padding token, quantization on (all ranks)."""
    lm_head = model.get_output_embeddings()
    total = torch.zeros(2, dtype=torch.float64)
    for batch, h_fp in zip(batches, finals, strict=True):
        inputs, valid = _model_inputs(batch, device)
        logits = model(**inputs).logits
        lq = F.log_softmax(logits[valid.to(logits.device)].float(), dim=-1)
        lp = F.log_softmax(lm_head(h_fp).float(), dim=-1).to(lq.device)
        total[0] += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
        total[1] += float(valid.sum())
    total = _all_reduce(total)
    return float(total[0] / max(float(total[1]), 1.0))


def _config_with(base: dict, layers: list[dict[str, bool]]) -> dict:
    return {"R1": base["R1"], "layers": copy.deepcopy(layers)}


# --------------------------------------------------------------------------- public API
def search_rotation_config(
    model: nn.Module,
    calibration_batches: Iterable[Mapping[str, Tensor]],
    strategy: str = "adaptive",
    criterion: str = "paper",
    *,
    optimizer: torch.optim.Optimizer | None = None,
    apply: bool = True,
) -> RotationSearchResult:
    """Choose per-layer R2/R3/R4 on/off from calibration data, apply and record the choice.

    Args:
        model: a model loaded with `from_pretrained(..., quantization_config=RoSTEConfig(...))`
            (weights on any device; any dtype: statistics are computed in fp32).
        calibration_batches: iterable of dicts with `input_ids` and `attention_mask` `[batch, seq]`
            tensors (e.g. from `sample_calibration_batches`, or a trainer's collator); other keys are
            ignored except `position_ids`. Under torch.distributed, each rank passes its own share.
        strategy: "adaptive" (the paper) or "layerwise" (adaptive, then greedy whole-model check).
        criterion: "paper" (weight + input / K / V quantization errors) or "output" (errors of
            each quantized linear's output and of the attention scores for R3).
        optimizer: when given (re-search during training), Adam/SGD moments of the parameters a
            changed rotation rewrites are transformed with them (`rotate_optimizer_state`).
        apply: fuse and record the result (default). False only measures and decides.

    Returns:
        `RotationSearchResult` (per-layer flags, errors off/on, totals; `to_markdown()` for cards).

    Raises:
        ValueError: unprepared model, unknown strategy/criterion, empty calibration data, batches
            without `attention_mask`.
    """
    state = get_state(model)
    inner = unwrap_peft(model)
    if inner is not model:
        trained = trained_lora_modules(model)
        if trained and apply:
            raise ValueError(
                f"search_rotation_config on a PEFT model whose LoRA adapters are trained ({len(trained)} non-zero "
                f"lora_B, e.g. {trained[0]}): a rotation change is fused into the base weights but not into the "
                "adapters, which would change the model. Search before training the adapters (RoSTESFTTrainer does "
                "at train start; rotation_search_interval is not supported with LoRA), or merge them first "
                "(merge_and_unload())."
            )
        model = inner  # LoRA wrappers are looked through (ArchAdapter.get returns their base layer)
    if strategy not in SEARCH_ALGORITHMS:
        raise ValueError(f"strategy={strategy!r} is invalid: expected one of {SEARCH_ALGORITHMS}.")
    if criterion not in SEARCH_CRITERIA:
        raise ValueError(f"criterion={criterion!r} is invalid: expected one of {SEARCH_CRITERIA}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None), got {type(optimizer).__name__}.")
    if not isinstance(apply, bool):
        raise TypeError(f"apply must be True or False, got {apply!r}.")
    batches = _check_batches(calibration_batches)
    start = time.perf_counter()
    device = _input_device(model)
    searchable = _searchable(model, state)
    old_applied = copy.deepcopy(state.applied)
    flags = _QuantFlags(model, state)
    snapshot = _WeightSnapshot(model, state) if strategy == "layerwise" else None
    whole: dict[str, float] = {}
    try:
        model.eval()
        flags.set(False)
        collector, finals = _measure(model, state, batches, criterion, searchable, device, strategy == "layerwise")
        reduced = _all_reduce(torch.cat([collector.sums.flatten(), torch.tensor([float(collector.tokens)])]))
        tokens = int(round(float(reduced[-1])))
        if tokens == 0:  # summed over every process, so every process raises alike
            raise ValueError(
                "Every calibration token is masked out (attention_mask is all zeros): the search would decide from "
                "nothing. Pass batches whose attention_mask marks the real tokens with 1."
            )
        collector.sums = reduced[:-1].reshape(collector.sums.shape)
        errs = collector.errors(tokens)
        layers = []
        for i, ok in enumerate(searchable):
            layers.append({n: bool(ok[n] and errs[i, TYPE_INDEX[n], 1] < errs[i, TYPE_INDEX[n], 0])
                           for n in PER_LAYER_ROTATIONS})
        if strategy == "layerwise":
            flags.set(True)
            layers, whole = _layerwise(model, state, batches, finals, device, searchable, layers)
            snapshot.restore()
    finally:
        flags.restore()
    rotation_config = {
        "R1": state.applied["R1"], "layers": layers,
        "errors": [{n: [float(errs[i, TYPE_INDEX[n], 0]), float(errs[i, TYPE_INDEX[n], 1])]
                    for n in PER_LAYER_ROTATIONS if ok[n]} for i, ok in enumerate(searchable)],
        "criterion": criterion, "strategy": strategy,
    }
    n_rows = float(sum(int(b["input_ids"].shape[0]) for b in batches))
    samples = int(round(float(_all_reduce(torch.tensor([n_rows]))[0])))
    rotation_config, whole = _broadcast((rotation_config, whole))  # one decision for every rank
    totals = {"off": 0.0, "on": 0.0, "chosen": 0.0}
    for e, chosen in zip(rotation_config["errors"], rotation_config["layers"], strict=True):
        for n, (off, on) in e.items():
            totals["off"] += off
            totals["on"] += on
            totals["chosen"] += on if chosen[n] else off
    if apply:
        set_rotation_config(model, rotation_config, record=True)
        if optimizer is not None:
            from .optim_state import rotate_optimizer_state

            rotate_optimizer_state(optimizer, model, old_applied, rotation_config)
    result = RotationSearchResult(
        rotation_config=rotation_config,
        errors=[{n: tuple(v) for n, v in e.items()} for e in rotation_config["errors"]],
        criterion=criterion, strategy=strategy, totals=totals, tokens=tokens,
        samples=samples,
        seconds=time.perf_counter() - start, whole_model=whole,
    )
    if _rank() == 0:
        logger.info("RoSTE rotation search (%s, criterion=%s, %d tokens):\n%s", strategy, criterion, tokens,
                    layer_table(result))
    return result


def _layerwise(model, state, batches, finals, device, searchable, adaptive_layers):
    """Greedy whole-model refinement of the adaptive choice (quantization on; see module doc)."""
    base = state.applied
    n = len(adaptive_layers)

    def evaluate(layers) -> float:
        set_rotation_config(model, _config_with(base, layers), record=False)
        return _whole_model_error(model, batches, finals, device)

    whole = {
        "all_off": evaluate([{k: False for k in PER_LAYER_ROTATIONS} for _ in range(n)]),
        "all_on": evaluate([{k: bool(ok[k]) for k in PER_LAYER_ROTATIONS} for ok in searchable]),
    }
    current = copy.deepcopy(adaptive_layers)
    best = evaluate(current)
    whole["adaptive"] = best
    for i in range(n):
        for name in PER_LAYER_ROTATIONS:
            if not searchable[i][name]:
                continue
            candidate = copy.deepcopy(current)
            candidate[i][name] = not candidate[i][name]
            e = evaluate(candidate)
            if e < best:  # identical on every rank: errors are all-reduced before comparing
                best, current = e, candidate
    whole["final"] = best
    return current, whole
