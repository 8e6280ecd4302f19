"""Pushing RoSTE models to the Hugging Face Hub with the project's model card.

    from hf_roste.export.hub import push_roste_model
    push_roste_model(model, "me/qwen2.5-0.5b-roste-w4a4kv4", base_model="Qwen/Qwen2.5-0.5B",
                     datasets=["trl-lib/tldr"], tokenizer=tokenizer)

`push_roste_model` saves the packed checkpoint into a temporary folder, writes `README.md` (from
`model_cards/roste_model_card.md.j2`) and the per-layer rotation error plot next to it, then makes ONE
commit with `HfApi.create_repo` + `HfApi.upload_folder`. transformers' own `push_to_hub` writes its
own README (overwriting a local card), so a RoSTE model's `push_to_hub` is routed here instead
(`install_push_to_hub`, called by the quantizer after loading), and `RoSTESFTTrainer.push_to_hub`
too.

Safety: offline mode (`HF_HUB_OFFLINE=1`, read from `huggingface_hub.constants` at call time) and a
missing token fail before anything is written; connection errors become a `HubPushError` with the
endpoint; the token is never written to a file or a log line (error texts are scrubbed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers.utils import logging

from ..config import RoSTEConfig
from ..folders import read_roste_quantization_config
from .model_card import PLOT_FILE, plot_rotation_errors, render_model_card

logger = logging.get_logger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload RoSTE quantized model"


class HubPushError(RuntimeError):
    """Pushing to the Hub is impossible (offline, no token, unreachable, or a refused request)."""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubPushError(
            "Cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to "
            "push, or keep the model local with model.save_pretrained(path)."
        )


def _resolve_token(token: str | bool | None) -> str:
    from huggingface_hub import get_token

    if token is False:
        raise HubPushError("token=False disables authentication, but pushing to the Hub needs a write token.")
    resolved = token if isinstance(token, str) and token else get_token()
    if not resolved:
        raise HubPushError(
            "No Hugging Face token found: pass token=..., set the HF_TOKEN environment variable, or run "
            "`hf auth login`. Pushing needs a token with write access."
        )
    return resolved


def _is_connection_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    connection = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                  "NetworkError", "Timeout", "OfflineModeIsEnabled", "ProxyError", "TimeoutError"}
    return bool(names & connection)


def _roste_config_of_dir(folder: str) -> RoSTEConfig:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} has no config.json: save the model with save_pretrained first.")
    qc = read_roste_quantization_config(folder)
    if qc is None:
        raise ValueError(
            f"{folder} is not a RoSTE checkpoint (its config.json has no quantization_config with quant_method "
            "'roste'); push_roste_model pushes models saved by hf_roste."
        )
    return RoSTEConfig.from_dict(qc)


def _num_layers(folder: str) -> int | None:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    text = cfg.get("text_config") or cfg
    return text.get("num_hidden_layers")


def prepare_push_folder(
    model_or_dir: nn.Module | str | os.PathLike,
    folder: str,
    *,
    repo_id: str,
    tokenizer: Any = None,
    **card_info: Any,
) -> list[str]:
    """Fill `folder` with what `push_roste_model` uploads; returns the relative file names.

    A model is saved packed (`save_pretrained` under `save_format(model, "packed")`); a directory is
    copied (its README.md, if any, is replaced by the RoSTE card).
    """
    from ..state import get_state, save_format

    if isinstance(model_or_dir, nn.Module):
        state = get_state(model_or_dir)
        with save_format(model_or_dir, "packed"):
            model_or_dir.save_pretrained(folder)
        if getattr(model_or_dir, "generation_config", None) is not None and not os.path.isfile(
                os.path.join(folder, "generation_config.json")):
            model_or_dir.generation_config.save_pretrained(folder)
        if card_info.get("base_model") is None:
            name = getattr(model_or_dir.config, "_name_or_path", None)
            if name and not os.path.isdir(name) and "/" in name:
                card_info["base_model"] = name
        del state
    else:
        src = os.fspath(model_or_dir)
        _roste_config_of_dir(src)
        shutil.copytree(src, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", ".cache", "README.md"))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    config = _roste_config_of_dir(folder)
    try:
        plot = PLOT_FILE if plot_rotation_errors(config, os.path.join(folder, PLOT_FILE)) else None
    except ImportError as exc:  # the card is still useful without its figure
        logger.warning("%s The model card is pushed without the plot.", exc)
        plot = None
    card = render_model_card(config, repo_id=repo_id, plot_file=plot, num_layers=_num_layers(folder), **card_info)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    files = []
    for root, _, names in os.walk(folder):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(files)


def push_roste_model(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    tokenizer: Any = None,
    base_model: str | None = None,
    datasets: Any = None,
    training_args: Any = None,
    eval_results: Mapping[str, Any] | None = None,
    **card_info: Any,
):
    """Upload a RoSTE model (or a saved RoSTE folder) with its model card in one commit.

    Args:
        model_or_dir: a RoSTE model (saved packed) or the folder of a saved RoSTE checkpoint.
        repo_id: `namespace/name` (or `name` in the token owner's namespace).
        token: a write token; default: the logged-in token (`HF_TOKEN` or `hf auth login`).
        private: create the repository private (existing repositories keep their visibility).
        commit_message: the commit message.
        tokenizer: saved next to the model when given.
        base_model, datasets, training_args, eval_results, **card_info: card contents (see
            `hf_roste.export.model_card.render_model_card`).

    Returns:
        the `huggingface_hub.CommitInfo` of the upload.

    Raises:
        HubPushError: offline mode, no token, Hub unreachable, or the Hub refused the request.
    """
    _check_online()
    resolved = _resolve_token(token)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=resolved)
    with tempfile.TemporaryDirectory(prefix="roste-push-") as folder:
        files = prepare_push_folder(model_or_dir, folder, repo_id=repo_id, tokenizer=tokenizer, base_model=base_model,
                                    datasets=datasets, training_args=training_args, eval_results=eval_results,
                                    **card_info)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            target = getattr(url, "repo_id", None) or repo_id
            logger.info("Uploading %d files to %s", len(files), target)
            info = api.upload_folder(repo_id=target, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr, repo_type="model")
        except HubPushError:
            raise
        except Exception as exc:
            from huggingface_hub import constants

            detail = _scrub(f"{type(exc).__name__}: {exc}", resolved)
            if _is_connection_error(exc):
                raise HubPushError(
                    f"Could not reach the Hugging Face Hub at {constants.ENDPOINT} ({detail}). Check the network "
                    "connection (or HF_ENDPOINT), then retry; nothing was uploaded."
                ) from None
            if isinstance(exc, HfHubHTTPError):
                raise HubPushError(f"The Hub refused the push to {repo_id!r}: {detail}") from None
            raise
    logger.info("Pushed RoSTE model to %s", target)
    return info


# ------------------------------------------------------------------------ model.push_to_hub
def _roste_push_to_hub(self, repo_id: str, commit_message: str | None = None, commit_description: str | None = None,
                       private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                       create_pr: bool = False, tags: list[str] | None = None, **kwargs: Any):
    """`push_to_hub` of RoSTE models: the packed checkpoint plus the RoSTE model card, in one commit.

    Extra keyword arguments go to the card (`base_model`, `datasets`, `tokenizer`, `eval_results`, ...);
    transformers' saving options (`max_shard_size`, `safe_serialization`, ...) are accepted and ignored.
    """
    for ignored in ("max_shard_size", "safe_serialization", "use_temp_dir", "variant", "save_jinja_files"):
        kwargs.pop(ignored, None)
    return push_roste_model(self, repo_id, token=token, private=private,
                            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, revision=revision,
                            create_pr=create_pr, tags=tags, **kwargs)


def install_push_to_hub(model: nn.Module) -> None:
    """Route `model.push_to_hub` to `push_roste_model` (an instance method; the class is untouched)."""
    model.push_to_hub = types.MethodType(_roste_push_to_hub, model)
