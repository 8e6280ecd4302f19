"""A tiny RoSTE training run used by the kill/resume and multi-process tests (run as a script)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_data import char_tokenizer, prompt_completion_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_roste import RoSTEConfig, get_state  # noqa: E402
from hf_roste.training import RoSTESFTConfig, RoSTESFTTrainer  # noqa: E402


class _Slow(TrainerCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds:
            time.sleep(self.seconds)


def build_trainer(model: str, output_dir: str, max_steps: int, save_steps: int, per_device: int, sleep: float = 0.0,
                  grad_accum: int = 1) -> RoSTESFTTrainer:
    torch.set_num_threads(1)
    args = RoSTESFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum, learning_rate=5e-3, logging_steps=1, report_to="none",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, use_cpu=True,
        gradient_checkpointing=False, lr_scheduler_type="constant", rotation_calibration_samples=16, seed=0,
        max_length=32, dataloader_num_workers=0, disable_tqdm=True, bf16=False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        log_quantization_error=False,
    )
    return RoSTESFTTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(64),
                           processing_class=char_tokenizer(), quantization_config=RoSTEConfig(),
                           callbacks=[_Slow(sleep)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--per-device", type=int, default=8)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report", default=None, help="JSON file for losses and the rotation configuration")
    a = p.parse_args()
    trainer = build_trainer(a.model, a.output, a.max_steps, a.save_steps, a.per_device, a.sleep)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    if a.report:
        rank = int(os.environ.get("RANK", "0"))
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        out = {"losses": losses, "layers": get_state(trainer.model).applied["layers"], "rank": rank}
        with open(f"{a.report}.{rank}", "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
