"""Progress bars honour the ecosystem's switches; the search table reaches report_to integrations (issue 24)."""

from __future__ import annotations

import io

import pytest
import torch
from tiny_data import char_tokenizer, prompt_completion_dataset
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.integrations import TensorBoardCallback

from hf_roste import RoSTEConfig, search_rotation_config
from hf_roste.export.checkpoint import packed_state_dict
from hf_roste.progress import progress_bars, progress_disabled
from hf_roste.training import RoSTESFTConfig, RoSTESFTTrainer
from hf_roste.training.report import SEARCH_TABLE_KEY


@pytest.fixture(scope="module")
def qat(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig(),
                                                dtype=torch.float32, attn_implementation="eager").eval()


def _bars(monkeypatch, fn) -> list[dict]:
    """Run fn with tqdm recorded: one dict (desc, disable, total) per bar created."""
    import tqdm.auto

    seen: list[dict] = []
    real = tqdm.auto.tqdm

    def fake(iterable=None, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("desc", "disable", "total", "unit")})
        kwargs["file"] = io.StringIO()
        return real(iterable, *args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", fake)
    fn()
    return seen


def test_search_and_packing_show_bars(qat, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    ids = sample_ids(2, 12)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with progress_bars(True):
        bars = _bars(monkeypatch, lambda: (search_rotation_config(qat, batches, apply=False), packed_state_dict(qat)))
    by_desc = {b["desc"]: b for b in bars}
    assert by_desc["rotation search (paper)"]["disable"] is False and by_desc["rotation search (paper)"]["unit"] == "batch"
    pack = by_desc["pack RoSTE weights"]
    assert pack["disable"] is False and pack["unit"] == "tensor"


@pytest.mark.parametrize("switch", ["env", "hub", "transformers", "trainer"])
def test_every_switch_turns_the_bars_off(qat, monkeypatch, switch):
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert not progress_disabled()
    if switch == "env":
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    elif switch == "hub":
        hub_utils.disable_progress_bars()
    elif switch == "transformers":
        hf_logging.disable_progress_bar()
    try:
        if switch == "trainer":
            with progress_bars(False):
                bars = _bars(monkeypatch, lambda: packed_state_dict(qat))
        else:
            bars = _bars(monkeypatch, lambda: packed_state_dict(qat))
    finally:
        hub_utils.enable_progress_bars()
        hf_logging.enable_progress_bar()
    assert bars and all(b["disable"] is True for b in bars)


class _FakeWriter:
    """The SummaryWriter calls TensorBoardCallback makes."""

    def __init__(self):
        self.texts, self.scalars, self.closed = [], [], False

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class _FakeTensorBoard(TensorBoardCallback):
    """transformers' TensorBoard integration with an in-memory writer (tensorboard is not installed here)."""

    def __init__(self):  # TensorBoardCallback.__init__ needs the tensorboard package
        TrainerCallback.__init__(self)
        self.tb_writer = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tb_writer is None:
            self.tb_writer = self.writer = _FakeWriter()


def test_search_table_is_logged_to_the_integrations(tiny_checkpoints, tmp_path):
    args = RoSTESFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4,
                          report_to="none", save_strategy="no", use_cpu=True, activation_checkpointing=False,
                          rotation_calibration_samples=8, max_length=32, disable_tqdm=True, bf16=False,
                          logging_steps=1)
    tb = _FakeTensorBoard()
    trainer = RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=args, train_dataset=prompt_completion_dataset(8),
                              processing_class=char_tokenizer(), quantization_config=RoSTEConfig(), callbacks=[tb])
    trainer.train()
    (tag, text, step), = tb.writer.texts
    assert tag == SEARCH_TABLE_KEY and step == 0
    assert text.startswith("| layer | R2 | R3 | R4 |") and text.count("\n| 1 |") == 1  # one row per layer
    assert trainer.last_search_result.to_markdown() == text
    assert any(tag.endswith("roste/search/layer_1/R4_error_on") for tag, _, _ in tb.writer.scalars)  # and scalars
