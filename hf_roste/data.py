"""Dataset loading and example formatting shared by `hf-roste sft`, `search`, `eval` and the benchmarks.

`load_any_dataset` accepts a Hub dataset id (`trl-lib/tldr`), a local data file (`.json`, `.jsonl`,
`.parquet`, `.csv`, `.arrow`) or a local folder (a `save_to_disk` folder or a folder of data
files), so everything can be exercised offline.

Example formats (TRL's): `prompt` + `completion` (strings or conversations), `messages`
(conversation), `text`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}

FORMATS_HELP = "'prompt' + 'completion', 'messages' (conversation) or 'text'"


def _builder_for(path: str) -> str | None:
    lower = path.lower()
    for suffix in (".json.gz", ".jsonl.gz"):
        if lower.endswith(suffix):
            return "json"
    return _FILE_BUILDERS.get(os.path.splitext(lower)[1])


class MissingSplitError(ValueError):
    """The dataset has no split of the requested name (`available` lists the ones it has)."""

    def __init__(self, name: str, split: str, available: list[str]) -> None:
        self.name, self.split, self.available = name, split, list(available)
        super().__init__(
            f"Dataset {name!r} has no split {split!r}; available splits: {self.available}. Ask for one of those."
        )


#: columns that hold text in the formats above; a CSV or JSON reader may type them as numbers
TEXT_COLUMNS = ("prompt", "completion", "text")


def load_any_dataset(name_or_path: str, config: str | None = None, split: str | None = "train",
                     streaming: bool = False):
    """Load `name_or_path` (Hub id, local data file or local folder) and return `split`.

    `split=None` returns the whole `DatasetDict`. A single local file has one split, `train`:
    asking for another split of it returns that same data (with an info log), so a test file can be
    passed as `--dataset test.jsonl` without naming a split. `prompt`, `completion` and `text`
    columns read as numbers (`24+48=,72` in a CSV) are turned back into strings. An empty,
    unparsable or example-less file raises a `ValueError` naming the file; a missing split a
    `MissingSplitError`.
    """
    import datasets

    if not name_or_path:
        raise ValueError("No dataset given: pass a Hub dataset id (e.g. trl-lib/tldr) or a local .jsonl/.json/.parquet file.")
    if os.path.isfile(name_or_path):
        builder = _builder_for(name_or_path)
        if builder is None:
            raise ValueError(
                f"Cannot tell the format of the local file {name_or_path!r}: use a .json, .jsonl, .parquet, .csv or "
                ".arrow file (or a folder written by Dataset.save_to_disk)."
            )
        if os.path.getsize(name_or_path) == 0:
            raise ValueError(f"The data file {name_or_path!r} is empty: it needs examples with {FORMATS_HELP}.")
        kwargs: dict[str, Any] = {}
        if builder == "csv":
            kwargs["converters"] = dict.fromkeys(TEXT_COLUMNS, str)  # keep "007" and "3.50" as written
        data = _load(name_or_path, builder, data_files={"train": name_or_path}, streaming=streaming, **kwargs)
        data = _text_columns_as_strings(data)
        if split is None:
            return data
        if split != "train":
            logger.info("%s is a single file: using all of it for split %r.", name_or_path, split)
        return data["train"]
    if os.path.isdir(name_or_path) and (
        os.path.isfile(os.path.join(name_or_path, "dataset_info.json"))
        or os.path.isfile(os.path.join(name_or_path, "dataset_dict.json"))
    ):
        try:
            data = datasets.load_from_disk(name_or_path)
        except IndexError as exc:  # datasets cannot concatenate the zero tables of an empty saved split
            raise ValueError(
                f"Cannot read the saved dataset {name_or_path!r}: a split of it holds no examples. Save it again "
                "with examples in every split."
            ) from exc
        data = _text_columns_as_strings(data)
        if isinstance(data, datasets.Dataset):
            return data
        return data if split is None else _pick_split(data, split, name_or_path)
    data = _text_columns_as_strings(_load(name_or_path, name_or_path, config, streaming=streaming))
    return data if split is None else _pick_split(data, split, name_or_path)


def _load(name: str, *args: Any, **kwargs: Any):
    """`datasets.load_dataset(*args, **kwargs)` with unreadable data reported as a `ValueError` naming `name`."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(*args, **kwargs)
    except DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        raise ValueError(
            f"Cannot read the dataset {name!r} ({detail}). Fix the file: .jsonl needs one JSON object per line, "
            ".json a list of objects (or one object per line), .csv a header row."
        ) from exc
    except StopIteration as exc:  # the json reader on a file without any record
        raise ValueError(f"The dataset {name!r} holds no examples: it needs examples with {FORMATS_HELP}.") from exc
    except ValueError as exc:
        if "corresponds to no data" in str(exc):
            raise ValueError(f"The dataset {name!r} holds no examples: it needs examples with {FORMATS_HELP}.") from exc
        raise


def _text_columns_as_strings(data):
    """`data` with non-string `prompt` / `completion` / `text` columns cast to strings (TRL needs strings)."""
    import datasets

    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(data)({k: _text_columns_as_strings(v) for k, v in data.items()})
    features = getattr(data, "features", None)
    if not features or (isinstance(data, datasets.Dataset) and len(data) == 0):
        return data
    for column in TEXT_COLUMNS:
        feature = features.get(column)
        if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
            logger.info("Column %r holds %s values: using them as strings.", column, feature.dtype)
            data = data.cast_column(column, datasets.Value("string"))
        elif type(feature).__name__ == "Json" and isinstance(data, datasets.Dataset) and all(
            v is None or isinstance(v, (str, int, float)) for v in data[column]
        ):  # strings mixed with numbers: the numbers become strings
            logger.info("Column %r mixes strings and numbers: using them all as strings.", column)
            target = data.features.copy()
            target[column] = datasets.Value("string")
            data = data.map(_numbers_as_strings, fn_kwargs={"column": column}, batched=True, features=target,
                            desc=f"Numbers in {column!r} as strings")
    return data


def _numbers_as_strings(batch: dict[str, list], column: str) -> dict[str, list]:
    values = batch[column]
    return {column: [str(v) if isinstance(v, (int, float)) else v for v in values]}


def _pick_split(data, split: str, name: str):
    if split in data:
        return data[split]
    raise MissingSplitError(name, split, sorted(data))


def dataset_format(columns) -> str:
    """'prompt_completion', 'messages', 'text' or 'tokenized'; ValueError naming the accepted formats."""
    cols = set(columns)
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "messages" in cols:
        return "messages"
    if "text" in cols:
        return "text"
    if "input_ids" in cols:
        return "tokenized"
    raise ValueError(f"The dataset has columns {sorted(cols)}; expected {FORMATS_HELP}.")


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value)


def split_prompt_reference(example: Mapping[str, Any], tokenizer) -> tuple[str, str]:
    """(prompt text, reference text) of a prompt/completion or messages example.

    Conversations are rendered with the tokenizer's chat template: the prompt is every message
    before the last assistant turn plus the generation prompt; the reference is that last turn's
    content.
    """
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if _is_conversation(prompt):
            prompt = _apply_template(tokenizer, prompt, add_generation_prompt=True)
        if _is_conversation(completion):
            completion = "".join(str(m.get("content", "")) for m in completion)
        return str(prompt), str(completion)
    if "messages" in example:
        messages = list(example["messages"])
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError("A 'messages' example has no assistant turn to use as the reference.")
        prompt = _apply_template(tokenizer, messages[:last], add_generation_prompt=True)
        return prompt, str(messages[last].get("content", ""))
    raise ValueError(f"Example with keys {sorted(example)} is not prompt/completion or messages.")


def scored_completion(example: Mapping[str, Any], tokenizer) -> tuple[str, str, bool]:
    """(prompt text, completion text, completion_is_rendered) for scoring a completion's likelihood.

    For a `messages` example the completion is what the chat template renders after the prompt
    for the last assistant turn (its content plus the template's end-of-turn tokens, which SFT
    trains on), when the rendered conversation starts with the rendered prompt; otherwise, and for
    prompt/completion data, it is the reference text (`completion_is_rendered` False).
    """
    prompt, reference = split_prompt_reference(example, tokenizer)
    if "messages" in example and not ("prompt" in example and "completion" in example):
        messages = list(example["messages"])
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        full = _apply_template(tokenizer, messages[: last + 1], add_generation_prompt=False)
        if full.startswith(prompt) and len(full) > len(prompt):
            return prompt, full[len(prompt):], True
    return prompt, reference, False


def _apply_template(tokenizer, messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The data is conversational but the tokenizer has no chat template: set tokenizer.chat_template "
            "(or pass a tokenizer that has one)."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def example_text(example: Mapping[str, Any], tokenizer) -> str:
    """The whole training text of an example (prompt + completion, rendered conversation, or text)."""
    if "text" in example and not ("prompt" in example and "completion" in example):
        return str(example["text"])
    if "messages" in example and "prompt" not in example:
        return _apply_template(tokenizer, list(example["messages"]), add_generation_prompt=False)
    prompt, reference = split_prompt_reference(example, tokenizer)
    return prompt + reference
