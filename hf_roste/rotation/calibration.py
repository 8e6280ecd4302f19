"""Deterministic calibration batches for the rotation search (reusable by the trainer)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _ids_of(example: Any, tokenizer, text_field: str, max_length: int | None) -> list[int]:
    if isinstance(example, str):
        text = example
    elif isinstance(example, Mapping) and "input_ids" in example:
        ids = example["input_ids"]
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return ids[:max_length] if max_length else ids
    elif isinstance(example, Mapping) and text_field in example:
        text = example[text_field]
    else:
        raise ValueError(
            f"Calibration example of type {type(example).__name__} is neither a string nor a mapping with "
            f"'input_ids' or {text_field!r}."
        )
    if tokenizer is None:
        raise ValueError("Calibration data holds text: pass tokenizer= to sample_calibration_batches.")
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return list(tokenizer(text, **kwargs)["input_ids"])


def sample_calibration_batches(
    data: Sequence[Any],
    n_samples: int = 128,
    *,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = 512,
    tokenizer=None,
    text_field: str = "text",
    collator: Callable[[list[dict]], Mapping[str, Tensor]] | None = None,
    pad_token_id: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[dict[str, Tensor]]:
    """Draw `n_samples` examples of `data` deterministically (given `seed`) and batch them.

    Args:
        data: a sequence supporting `len` and integer indexing (list, `datasets.Dataset`) of texts,
            or of mappings with `input_ids` (pre-tokenized) or `text_field` (text).
        n_samples: examples to draw without replacement (all of `data` if it is smaller).
        seed: seed of the draw (a `torch.Generator`, independent of the global RNG).
        batch_size: rows per batch.
        max_length: truncation length in tokens (None: no truncation).
        tokenizer: needed for text examples; its `pad_token_id` (else `eos_token_id`) pads.
        collator: optional callable turning a list of `{"input_ids": [...]}` into a batch dict
            (e.g. the trainer's collator); it must return `attention_mask`.
        pad_token_id: padding id when no collator is given (default: tokenizer's, else 0).
        rank, world_size: take every `world_size`-th drawn example starting at `rank`
            (default: the torch.distributed rank/world size when initialised), so ranks share the
            same draw without overlap.

    Returns:
        List of dicts with `input_ids` and `attention_mask` (`[batch, seq]` int64, right padding).
    """
    if data is None or len(data) == 0:
        raise ValueError("sample_calibration_batches got empty calibration data.")
    for name, value in (("n_samples", n_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sample_calibration_batches: {name} must be an int >= 1, got {value!r}.")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"sample_calibration_batches: max_length must be None or an int >= 1, got {max_length!r}.")
    if (rank is None) != (world_size is None):
        raise ValueError("sample_calibration_batches: pass both rank and world_size, or neither.")
    if world_size is not None and not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"sample_calibration_batches: need world_size >= 1 and 0 <= rank < world_size, got "
                         f"rank={rank!r}, world_size={world_size!r}.")
    if len(data) < n_samples:
        logger.warning("Calibration data has %d examples, fewer than n_samples=%d: using all.", len(data), n_samples)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(data), generator=g)[: min(n_samples, len(data))].tolist()
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    if len(order) < world_size:  # the same on every rank: all raise, none waits for the others
        raise ValueError(
            f"sample_calibration_batches: {len(order)} calibration example(s) for {world_size} processes; every "
            f"process needs at least one. Draw n_samples >= {world_size} from data with at least that many examples."
        )
    order = order[rank::world_size]
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0
    batches = []
    for start in range(0, len(order), batch_size):
        seqs = [_ids_of(data[int(i)], tokenizer, text_field, max_length) for i in order[start:start + batch_size]]
        seqs = [s for s in seqs if len(s) > 0]
        if not seqs:
            continue
        if collator is not None:
            batch = dict(collator([{"input_ids": s} for s in seqs]))
            batches.append({k: v for k, v in batch.items() if isinstance(v, Tensor)})
            continue
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    if not batches:
        raise ValueError("sample_calibration_batches: every drawn example is empty after tokenization.")
    return batches
