"""The RoSTE authors' SFT text format, for the `paper` recipes.

The authors' `train_qa_sft_roste.py` (TRL 0.11.4, transformers 4.40.1) sets `tokenizer.chat_template = None`
and passes the prompt/completion dataset `trl-lib/tldr` to `SFTTrainer` without a collator. TRL 0.11
then formats every example as a two-turn conversation (user = prompt, assistant = completion) with
`tokenizer.apply_chat_template`, which, with no template set, falls back to the tokenizer class's legacy
default (removed in transformers 4.43):

- ``chatml`` (`PreTrainedTokenizerBase`, used by the Qwen2 tokenizer):
  ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{completion}<|im_end|>\\n``;
- ``eos_concat`` (GPT-2 / GPT-NeoX tokenizers, Pythia): ``{prompt}{eos}{completion}{eos}``.

The text is tokenized as TRL 0.11 did (special tokens added by the tokenizer's own rule, truncation to
`max_length`, no padding), and the loss covers every token (TRL 0.11's default language-modeling
collator; padding masked). `legacy_text_dataset` builds exactly those token ids, so TRL adds nothing
(no extra eos) and `completion_only_loss` must be false.
"""

from __future__ import annotations

LEGACY_CHAT_TEMPLATES = ("chatml", "eos_concat")


def render_legacy(prompt: str, completion: str, template: str, eos_token: str | None) -> str:
    """One training text in the legacy default chat format `template`."""
    if template == "chatml":
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>\n"
    if template == "eos_concat":
        if not eos_token:
            raise ValueError("legacy_chat_template 'eos_concat' appends the eos token, but the tokenizer has none.")
        return f"{prompt}{eos_token}{completion}{eos_token}"
    raise ValueError(f"legacy_chat_template={template!r} is invalid: expected one of {LEGACY_CHAT_TEMPLATES}.")


def legacy_text_dataset(dataset, tokenizer, template: str, max_length: int | None):
    """Pre-tokenized `input_ids` of every prompt/completion example in `template` (the `prompt` column is kept
    for the authors' calibration; TRL drops it before batching)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None or not {"prompt", "completion"} <= set(columns):
        raise ValueError(f"legacy_chat_template needs a prompt/completion dataset with plain-text columns; got {columns}.")
    first = dataset[0]
    if not isinstance(first["prompt"], str) or not isinstance(first["completion"], str):
        raise ValueError("legacy_chat_template needs plain-text 'prompt' and 'completion' (not conversations).")
    kw = {"truncation": True, "max_length": max_length} if max_length else {}

    def encode(example: dict) -> dict:
        text = render_legacy(example["prompt"], example["completion"], template, tokenizer.eos_token)
        return {"input_ids": tokenizer(text, add_special_tokens=True, **kw)["input_ids"]}

    drop = [c for c in columns if c != "prompt"]
    return dataset.map(encode, remove_columns=drop, desc=f"legacy {template} format")
