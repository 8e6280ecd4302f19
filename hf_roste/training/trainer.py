"""`RoSTESFTTrainer`: TRL's SFTTrainer with the RoSTE rotation search and QAT bookkeeping.

What it adds to `SFTTrainer`:
- accepts a RoSTE model, or a path plus `quantization_config=RoSTEConfig(...)`;
- before the optimizer exists, draws calibration samples from the (processed) training data
  through the trainer's own collator and runs the rotation search; optionally re-runs it every
  `rotation_search_interval` steps, transforming the optimizer moments with the weights;
- LoRA adapters train inside the weight quantizer (`QATLoraLinear`), so merging is exact;
- every checkpoint holds full-precision master weights plus `roste_state.json` (the rotation
  configuration), and `resume_from_checkpoint` restores that exact configuration;
- logs the search table and per-layer quantization errors through the usual `report_to`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging
from trl import SFTTrainer

from ..config import PER_LAYER_ROTATIONS, SEARCH_ALGORITHMS, RoSTEConfig
from ..folders import is_roste_checkpoint
from ..io import atomic_write_text
from ..rotation.fusion import set_rotation_config
from ..rotation.search import search_rotation_config
from ..state import RoSTEState, get_state, save_format, unwrap_peft
from .calibration_data import first_prompts, prompt_batches, truncate_batch
from .checkpoints import (
    has_adapter_weights,
    is_peft,
    last_complete_checkpoint,
    load_master_weights,
    refuse_packed_folder,
)
from .config import RoSTESFTConfig
from .lora import check_no_foreign_lora, register_roste_lora
from .monitor import QuantErrorMonitor
from .state import STATE_FILE, check_saved_quantization_config, read_state_file

logger = logging.get_logger(__name__)
_DATASET_FORMATS = (
    "'text' (language modeling), 'messages' (conversational), 'prompt' + 'completion' "
    "(prompt-completion, the paper's completion-only loss), or pre-tokenized 'input_ids'"
)


def _check_dataset_columns(dataset, name: str, has_formatting_func: bool) -> None:
    columns = getattr(dataset, "column_names", None)
    if columns is None or has_formatting_func:
        return
    cols = set(columns)
    ok = "text" in cols or "messages" in cols or "input_ids" in cols or {"prompt", "completion"} <= cols
    if not ok:
        raise ValueError(
            f"{name} has columns {sorted(cols)}, none of the formats RoSTESFTTrainer (TRL SFT) trains on: "
            f"{_DATASET_FORMATS}. Rename your columns or pass formatting_func=..."
        )


def _check_trainable(state: RoSTEState) -> None:
    if state.packed:
        raise ValueError(
            "This model was loaded from a packed RoSTE checkpoint (integer codes, no full-precision weights), which "
            "cannot be fine-tuned: only its embeddings and norms would train. Fine-tune the full-precision model "
            "instead: a trainer checkpoint-* folder (master weights) or the original base loaded with "
            "quantization_config=RoSTEConfig(...)."
        )


class _RoSTECallback(TrainerCallback):
    """Logs pending search results at train start, arms the error monitor, re-runs the search."""

    def __init__(self, trainer: RoSTESFTTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        due, self.trainer._resume_search_step = self.trainer._resume_search_step, None
        if due is not None and due == state.global_step and state.global_step < state.max_steps:
            # the checkpoint was the last step of an earlier run (no re-search there): do the one an
            # uninterrupted run would have done after this step, with the restored optimizer
            self.trainer.run_rotation_search(optimizer=kwargs.get("optimizer") or self.trainer.optimizer)
        pending, self.trainer._pending_logs = self.trainer._pending_logs, {}
        if pending:
            self.trainer.log(pending)
        self.trainer._flush_search_table()

    def on_step_begin(self, args, state, control, **kwargs):
        monitor = self.trainer._monitor
        if monitor is None or args.logging_strategy != "steps":
            return
        if (state.global_step + 1) % max(1, int(args.logging_steps)) == 0:
            monitor.arm()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._nonfinite_loss:
            # a non-finite loss is never applied: drop every gradient of this optimizer step
            self.trainer._nonfinite_loss = False
            self.trainer.skipped_nonfinite_steps.append(state.global_step + 1)
            self.trainer.model.zero_grad(set_to_none=True)
            if self.trainer.optimizer is not None:
                self.trainer.optimizer.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):
        interval = args.rotation_search_interval
        if interval and state.global_step % interval == 0 and state.global_step < state.max_steps:
            self.trainer.run_rotation_search(optimizer=kwargs.get("optimizer") or self.trainer.optimizer)


class RoSTESFTTrainer(SFTTrainer):
    """QA-SFT with RoSTE: `SFTTrainer` plus rotation search, exact LoRA merges and RoSTE checkpoints.

    Args:
        model: a model loaded with `quantization_config=RoSTEConfig(...)`, a path or Hub id plus
            `quantization_config`, or the path of a saved RoSTE checkpoint.
        args: `RoSTESFTConfig` (a plain `SFTConfig` is upgraded with the RoSTE defaults).
        quantization_config: the `RoSTEConfig` used when `model` is a path.
        peft_config: optional `peft.LoraConfig` (lora_dropout must be 0).
        Every other argument is `SFTTrainer`'s.
    """

    def __init__(
        self,
        model,
        args: RoSTESFTConfig | None = None,
        train_dataset=None,
        processing_class=None,
        quantization_config: RoSTEConfig | None = None,
        peft_config=None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            raise ValueError("RoSTESFTTrainer needs args=RoSTESFTConfig(output_dir=...).")
        if not isinstance(args, RoSTESFTConfig):
            # field values, not `to_dict()`: that one replaces every `*_token` field by a placeholder
            fields = {f.name for f in dataclasses.fields(RoSTESFTConfig) if f.init}
            args = RoSTESFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                                     if f.init and f.name in fields})
        if quantization_config is not None and not isinstance(quantization_config, RoSTEConfig):
            raise TypeError(
                f"RoSTESFTTrainer(quantization_config=...) must be a RoSTEConfig, got {type(quantization_config).__name__}."
            )
        if isinstance(model, str):
            if quantization_config is None and not is_roste_checkpoint(model, hub=True):
                raise ValueError(
                    f"{model!r} is not a RoSTE checkpoint: pass quantization_config=RoSTEConfig(...) to turn it into a "
                    "RoSTE QAT model, or pass a model loaded with it."
                )
        else:
            _check_trainable(get_state(model))  # get_state raises a clear error for models not prepared for RoSTE
            check_no_foreign_lora(model)
            if quantization_config is not None:
                raise ValueError(
                    "The model is already a RoSTE model; do not pass quantization_config again (it would be ignored)."
                )
        if train_dataset is not None:
            _check_dataset_columns(train_dataset, "train_dataset", kwargs.get("formatting_func") is not None)
        # the authors' calibration reads the raw prompts, which TRL's processing below would drop
        self._calibration_prompts = first_prompts(train_dataset, args) if args is not None else None
        if peft_config is not None:
            if args is not None and getattr(args, "rotation_search_interval", None):
                raise ValueError(
                    "RoSTESFTConfig.rotation_search_interval is not supported with peft_config: a re-search fuses "
                    "rotation changes into the base weights but not into the trained LoRA adapters. With LoRA the "
                    "search runs once, at train start; set rotation_search_interval=None."
                )
            register_roste_lora(peft_config)
        self._pending_logs: dict[str, float] = {}
        self._pending_table = None  # RotationSearchResult whose table is not logged yet
        self._monitor: QuantErrorMonitor | None = None
        self._calibration: list[dict[str, torch.Tensor]] | None = None
        self._nonfinite_loss = False
        #: optimizer steps (1-based, as `state.global_step` after them) skipped for a non-finite loss
        self.skipped_nonfinite_steps: list[int] = []
        self.last_search_result = None
        self._last_search_step: int | None = None  # global step of the last search (0 = before training)
        self._resume_search_step: int | None = None  # set on resume when a re-search is owed at that step
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            quantization_config=quantization_config,
            peft_config=peft_config,
            **kwargs,
        )
        self.roste_state: RoSTEState = get_state(self.model)
        _check_trainable(self.roste_state)
        if args.log_quantization_error and args.torch_compile:
            logger.warning(
                "log_quantization_error: the per-layer quantization errors are measured by forward hooks that synchronise "
                "with the host, which a compiled graph does not run; with torch_compile=True they are not logged. "
                "Set log_quantization_error=False to silence this, or train without torch_compile to see them."
            )
        elif args.log_quantization_error:
            self._monitor = QuantErrorMonitor(self.model)
        self.add_callback(_RoSTECallback(self))
        if args.rotation_search == "all":  # every allowed per-layer rotation on, no search
            cfg = self.roste_state.config
            num_layers = self.roste_state.adapter.num_layers(unwrap_peft(self.model))
            flags = {name: name in cfg.rotations for name in PER_LAYER_ROTATIONS}
            set_rotation_config(self.model, {"R1": self.roste_state.applied["R1"],
                                             "layers": [dict(flags) for _ in range(num_layers)]})

    # ------------------------------------------------------------------ search
    def _wants_search(self) -> str | None:
        strategy = self.args.rotation_search
        if strategy in ("none", "all"):
            return None
        if strategy is not None:
            return strategy
        cfg = self.roste_state.config
        if cfg.rotation_search in SEARCH_ALGORITHMS and not self.roste_state.searched:
            return cfg.rotation_search
        return None

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """`rotation_calibration_samples` training samples, batched by the trainer's collator.

        Deterministic given `rotation_search_seed` (default: the training seed) and identical on
        every rank. Only `input_ids`, `attention_mask` (padding excluded from every statistic)
        and `position_ids` are kept.
        """
        if self._calibration is not None:
            return self._calibration
        if self._calibration_prompts is not None:
            self._calibration = prompt_batches(self._calibration_prompts, self.processing_class, self.args)
            return self._calibration
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError("The rotation search needs a non-empty, indexable train_dataset to draw calibration samples.")
        seed = self.args.rotation_search_seed if self.args.rotation_search_seed is not None else self.args.seed
        n = min(self.args.rotation_calibration_samples, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each rank measures its share; the search all-reduces the errors, so every rank decides alike
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if n < world:  # raised on every rank alike (a rank with no samples would leave the others waiting)
                raise ValueError(
                    f"The rotation search draws {n} calibration sample(s) but there are {world} processes: every "
                    f"process needs at least one. Set rotation_calibration_samples >= {world} (paper: 128)"
                    + (" or pass a larger train_dataset." if n < self.args.rotation_calibration_samples else ".")
                )
            order = order[rank::world]
        size = max(1, self.args.per_device_train_batch_size)
        batches = []
        for start in range(0, len(order), size):
            raw = self.data_collator([dataset[i] for i in order[start : start + size]])
            batch = {k: raw[k] for k in ("input_ids", "attention_mask", "position_ids") if k in raw}
            if "attention_mask" not in batch:
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            batch = truncate_batch(batch, self.args.rotation_calibration_max_length)
            batches.append(batch)
        self._calibration = batches
        return batches

    def run_rotation_search(self, strategy: str | None = None, optimizer=None):
        """Run the search now (before training, or between steps with the optimizer given)."""
        strategy = strategy or self.args.rotation_search or "adaptive"
        if strategy not in SEARCH_ALGORITHMS:
            raise ValueError(f"run_rotation_search() needs a search strategy in {SEARCH_ALGORITHMS}, got {strategy!r}.")
        from ..progress import progress_bars

        was_training = self.model.training
        self.model.eval()
        try:
            with progress_bars(not self.args.disable_tqdm):
                result = search_rotation_config(
                    self.model, self.calibration_batches(), strategy=strategy,
                    criterion=self.args.rotation_search_criterion, optimizer=optimizer,
                )
        finally:
            self.model.train(was_training)
        self.last_search_result = result
        self._pending_table = result  # logged as a table when the report_to integrations are set up
        self._last_search_step = self.state.global_step
        logs = {}
        for i, row in enumerate(result.table()):
            for name in ("R2", "R3", "R4"):
                if name in row and isinstance(row[name], bool):
                    logs[f"roste/search/layer_{i}/{name}"] = float(row[name])
                err = row.get(f"{name}_error")
                if err is not None:
                    logs[f"roste/search/layer_{i}/{name}_error_off"] = float(err[0])
                    logs[f"roste/search/layer_{i}/{name}_error_on"] = float(err[1])
        logs.update({f"roste/search/{k}": float(v) for k, v in result.to_dict().get("totals", {}).items()
                     if isinstance(v, (int, float))})
        # logged with the next training log (before training: at train start)
        self._pending_logs.update(logs)
        return result

    # ------------------------------------------------------------------ train / resume
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = last_complete_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-* folder "
                    f"(a complete one ends with {STATE_FILE})."
                )
            resume_from_checkpoint = path
        if path:
            self._restore_rotation_state(path)
        else:
            strategy = self._wants_search()
            if strategy is not None:
                self.run_rotation_search(strategy)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_rotation_state(self, checkpoint: str) -> None:
        """Check the checkpoint's quantizer settings against the model's and apply its rotation configuration."""
        saved = read_state_file(checkpoint)
        refuse_packed_folder(checkpoint)
        check_saved_quantization_config(saved, self.roste_state.config, checkpoint)
        set_rotation_config(self.model, saved["rotation_config"], record=True)
        self.roste_state.searched = bool(saved.get("searched", True))
        self._last_search_step = saved.get("last_search_step")
        step, interval = saved.get("global_step"), self.args.rotation_search_interval
        if interval and isinstance(step, int) and step > 0 and step % interval == 0 and \
                isinstance(self._last_search_step, int) and self._last_search_step < step:
            self._resume_search_step = step  # checked against the restored state at train begin
        logger.info("RoSTE: restored the rotation configuration of %s", checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint's weights: verified, renamed like `from_pretrained` does, strictly.

        transformers' version reads the file directly and loads with `strict=False`, so renamed
        keys (GPT-NeoX saves `lm_head` as `embed_out`) are silently left untrained and corrupted
        files are not noticed. Adapter-only (PEFT) and FSDP/DeepSpeed checkpoints go through
        transformers, after the same rotation / quantizer checks.
        """
        target = model if model is not None else self.model
        if is_peft(target) and not has_adapter_weights(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} holds no LoRA adapter weights (adapter_model.safetensors) but this trainer "
                "trains LoRA adapters (peft_config): it is a full fine-tuning checkpoint. Resume it without "
                "peft_config, or resume a LoRA run from its own checkpoints."
            )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or is_peft(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_master_weights(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        """Restore the best checkpoint's rotation configuration, then its weights (not just the weights)."""
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isfile(os.path.join(best, STATE_FILE)):
            return super()._load_best_model()
        self._restore_rotation_state(best)
        self._resume_search_step = None  # training is over: no re-search is owed
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or is_peft(self.model):
            return super()._load_best_model()
        load_master_weights(self.model, best)
        return None

    def _write_state_file(self, folder: str) -> None:
        state = self.roste_state
        data = {
            "rotation_config": {"R1": state.applied["R1"], "layers": state.applied["layers"]},
            "searched": state.searched,
            "quantization_config": state.config.to_dict(),
            "global_step": self.state.global_step,
            "last_search_step": self._last_search_step,
        }
        atomic_write_text(os.path.join(folder, STATE_FILE), json.dumps(data, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, then `roste_state.json` written last (atomically) as the completion mark.

        Old checkpoints are rotated out (`save_total_limit`) only after the new one is complete, so
        a process killed at any moment leaves at least one complete checkpoint.
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            self._write_state_file(folder)
            if limit:
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) keep master weights; the final save writes the packed model.

        With LoRA, the adapters are saved as usual (merge with `merge_and_unload()` and
        `save_pretrained` for a packed model).
        """
        fmt = "master" if _internal_call else "packed"
        if self.roste_state.packed:
            fmt = "packed"
        with save_format(self.model, fmt):
            super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.args.should_save:
            self._write_state_file(output_dir or self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """transformers' `_save`, then `training_args.bin` re-written without tokens.

        transformers pickles the whole `TrainingArguments` into every checkpoint and output folder,
        `hub_token` included (its JSON/str forms redact it, the pickle does not); folders are often
        uploaded, so the token is replaced by None there.
        """
        super()._save(output_dir, state_dict=state_dict)
        secrets = [f for f in self.args.__dataclass_fields__ if f.endswith("_token") and getattr(self.args, f, None)]
        if not secrets or not self.args.should_save:
            return
        from transformers.trainer import TRAINING_ARGS_NAME

        redacted = copy.copy(self.args)
        for name in secrets:
            object.__setattr__(redacted, name, None)
        path = os.path.join(output_dir if output_dir is not None else self.args.output_dir, TRAINING_ARGS_NAME)
        torch.save(redacted, path + ".tmp")
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------------ hub
    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs: Any):
        """Push the packed model, tokenizer and the RoSTE model card (with the training hyperparameters,
        the rotation search and `eval_results=` when given) in one commit (`hf_roste.export.hub`).

        The repository is `args.hub_model_id` (default: the output folder's name); `token` defaults to
        `args.hub_token`, `private` to `args.hub_private_repo`. Extra keyword arguments go to the card.
        """
        from ..export.hub import push_roste_model

        if not blocking:
            logger.warning("push_to_hub(blocking=False): the RoSTE push uploads the packed model and its card in one "
                           "commit and returns when it is done (no background upload).")
        self.save_model()
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))
        # Trainer / SFTTrainer create_model_card keywords, mapped onto the RoSTE card's fields
        for theirs, ours in (("model_name", "title"), ("finetuned_from", "base_model"), ("dataset_name", "datasets"),
                             ("dataset", "datasets"), ("dataset_tags", "datasets")):
            if theirs in kwargs:
                value = kwargs.pop(theirs)
                if value is not None and kwargs.get(ours) is None:
                    kwargs[ours] = value
        if kwargs.get("tasks") not in (None, "text-generation", ["text-generation"]):
            raise ValueError(f"push_to_hub(tasks={kwargs['tasks']!r}): a RoSTE model card is for text-generation.")
        kwargs.pop("tasks", None)
        if kwargs.pop("dataset_args", None) is not None:
            raise ValueError("push_to_hub(dataset_args=...) is not supported by the RoSTE model card.")
        return push_roste_model(
            self.model, repo_id, token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training", revision=revision,
            tokenizer=self.processing_class, training_args=self.args, **kwargs,
        )

    # ------------------------------------------------------------------ non-finite losses
    def training_step(self, model, inputs, num_items_in_batch=None):
        """transformers' step, plus: a non-finite loss is reported and its optimizer step skipped.

        transformers only hides a NaN/Inf loss from the logged average (`logging_nan_inf_filter`)
        and still applies its gradients. Here the whole optimizer step the micro-batch belongs to is
        skipped (gradients dropped, weights and optimizer moments unchanged; the scheduler and
        `global_step` advance as usual), a warning names the step, and the step is recorded in
        `trainer.skipped_nonfinite_steps` and logged as `roste/skipped_nonfinite_steps`.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = True
            logger.warning(
                "RoSTE: non-finite training loss (%s) at optimizer step %d: the gradients of this step are dropped "
                "and the weights are not updated.", loss.detach().float().item(), self.state.global_step + 1,
            )
        return loss

    # ------------------------------------------------------------------ logging
    def _flush_search_table(self) -> None:
        """Log the last search's per-layer table to the report_to integrations (`hf_roste.training.report`)."""
        result, self._pending_table = getattr(self, "_pending_table", None), None
        if result is not None and self.is_world_process_zero():
            from .report import log_search_table

            log_search_table(self.callback_handler.callbacks, result, self.state.global_step)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and getattr(self, "_pending_table", None) is not None:  # a re-search between steps
            self._flush_search_table()
        if "loss" in logs and self._pending_logs:  # results of a re-search between steps
            pending, self._pending_logs = self._pending_logs, {}
            logs = {**logs, **pending}
        if self._monitor is not None and "loss" in logs:
            logs = {**logs, **self._monitor.pop_metrics()}
        if "loss" in logs and self.skipped_nonfinite_steps:
            logs = {**logs, "roste/skipped_nonfinite_steps": float(len(self.skipped_nonfinite_steps))}
        super().log(logs, *args, **kwargs)
