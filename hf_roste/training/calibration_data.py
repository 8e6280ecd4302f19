"""Calibration samples of the rotation search other than the default random training examples.

`rotation_calibration_source="first_prompts"` reproduces the RoSTE authors' calibration
(`rotate_model_r234_quant_error.py`): the first N examples of the training split, prompt text only, in
dataset order, tokenized with truncation to `rotation_calibration_max_length` tokens (the start kept) and
left-padded. Padding positions carry `attention_mask` 0 and are excluded from every statistic of the search
(the authors' forward also measured the padded positions).
"""

from __future__ import annotations

import torch


def first_prompts(train_dataset, args) -> list[str] | None:
    """The first `rotation_calibration_samples` raw prompts when `args` asks for them, else None."""
    if getattr(args, "rotation_calibration_source", "train_sample") != "first_prompts":
        return None
    if train_dataset is None or not hasattr(train_dataset, "__len__") or len(train_dataset) == 0:
        raise ValueError("rotation_calibration_source='first_prompts' needs a non-empty, indexable train_dataset.")
    columns = getattr(train_dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"rotation_calibration_source='first_prompts' reads the 'prompt' column, but train_dataset has "
            f"{columns}. Use a prompt/completion dataset, or rotation_calibration_source='train_sample'."
        )
    n = min(args.rotation_calibration_samples, len(train_dataset))
    prompts = [train_dataset[i]["prompt"] for i in range(n)]
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(
            f"rotation_calibration_source='first_prompts' needs plain-text prompts; example {bad[0]} holds a "
            f"{type(prompts[bad[0]]).__name__} (conversational data): use rotation_calibration_source='train_sample'."
        )
    return prompts


def prompt_batches(prompts: list[str], tokenizer, args) -> list[dict[str, torch.Tensor]]:
    """Tokenized, left-padded batches of `prompts` (this rank's share when distributed)."""
    if tokenizer is None:
        raise ValueError("rotation_calibration_source='first_prompts' needs the trainer's processing_class (tokenizer).")
    order = list(range(len(prompts)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if len(order) < world:
            raise ValueError(f"The rotation search has {len(order)} calibration prompt(s) for {world} processes: "
                             f"set rotation_calibration_samples >= {world} (paper: 128).")
        order = order[rank::world]
    saved = (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    m = args.rotation_calibration_max_length
    size = max(1, args.per_device_train_batch_size)
    batches = []
    try:
        for start in range(0, len(order), size):
            texts = [prompts[i] for i in order[start:start + size]]
            kw = {"truncation": True, "max_length": m} if m else {}
            enc = tokenizer(texts, padding=True, return_attention_mask=True, return_tensors="pt", **kw)
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    finally:
        tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token = saved
    return batches


def truncate_batch(batch: dict[str, torch.Tensor], max_length: int | None) -> dict[str, torch.Tensor]:
    """Keep the first `max_length` positions of every sequence tensor of a collated batch (None: unchanged)."""
    if not max_length or batch["input_ids"].shape[1] <= max_length:
        return batch
    return {k: v[:, :max_length] if v.dim() == 2 else v for k, v in batch.items()}
