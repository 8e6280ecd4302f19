"""Crash trials run in ONE fresh process (imports paid once); each victim is a forked child killed with SIGKILL.

    python tests/reliability/crash_driver.py --model TINY_LLAMA_DIR --work DIR --report OUT.json
        [--save-trials 6] [--train-trials 5] [--budget 100] [--seed 0]

Children come from a `multiprocessing` fork server (started once, single-threaded, preloaded with
this module), so each trial costs no import time and cannot inherit a lock held by another thread.

1. Atomic save: a RoSTE model is saved (v1) into a folder; a child re-saves changed weights (v2) into
   it with a slowed writer and is killed at a random moment. The folder must load as exactly v1 or v2.
   A control child does the same through transformers' plain (non-atomic) `save_pretrained`.
2. Kill -9 during training: a child trains 8 steps (checkpoints every 2) and is killed at a random
   time (plus one trial killed inside a checkpoint write); the parent resumes from the last complete
   checkpoint and compares rotations and every later loss with an uninterrupted reference run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

import torch

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "training"))

import transformers.modeling_utils as modeling_utils  # noqa: E402
from tiny_models import sample_ids  # noqa: E402
from train_script import build_trainer  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from hf_roste import RoSTEConfig, get_state  # noqa: E402
from hf_roste.training.trainer import last_complete_checkpoint  # noqa: E402

try:  # imported lazily by transformers on every load: import it once, in the fork server too
    import torchao  # noqa: E402, F401
except ImportError:  # pragma: no cover
    pass


def _slow_writer(marker: str, chunks: int = 20, pause: float = 0.03, only: str | None = None):
    """A `safe_save_file` that writes the real file in pieces, pausing in between (a slow disk)."""
    real = modeling_utils.safe_save_file

    def write(tensors, filename, metadata=None):
        if only is not None and only not in filename:
            return real(tensors, filename, metadata=metadata)
        tmp = filename + ".full"
        real(tensors, tmp, metadata=metadata)
        data = open(tmp, "rb").read()
        os.remove(tmp)
        with open(marker, "w") as f:
            f.write(filename)
        step = max(1, len(data) // chunks)
        with open(filename, "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i : i + step])
                f.flush()
                time.sleep(pause)

    return write


def _start(target, *args):
    """Run `target(*args)` in a child forked from a single-threaded fork server (preloaded with this
    module's imports): plain os.fork() of this multi-threaded process can deadlock the child."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _wait_for(path: str, proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if not proc.is_alive():
            return False
        time.sleep(0.005)
    return False


def _kill(proc) -> bool:
    """SIGKILL; True if the child was still running."""
    running = proc.is_alive()
    if running:
        proc.kill()
    proc.join(30)
    return running


def _save_child(model_dir: str, weights: str, target: str, marker: str, plain: bool) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 quantization_config=RoSTEConfig(rotation_search="all")).eval()
    model.load_state_dict(load_file(weights))
    modeling_utils.safe_save_file = _slow_writer(marker)
    if plain:
        type(model).save_pretrained(model, target)  # transformers' own, in place
    else:
        model.save_pretrained(target)  # hf_roste's atomic override


def _train_child(model_dir: str, run: str, marker: str, plan: str) -> None:
    torch.set_num_threads(1)
    if plan == "in_checkpoint_write":
        modeling_utils.safe_save_file = _slow_writer(marker, chunks=50, pause=0.2, only="checkpoint-4")
    trainer = build_trainer(model_dir, run, max_steps=8, save_steps=2, per_device=8, sleep=0.1)
    if plan != "in_checkpoint_write":
        trainer.add_callback(_Marker(marker))
    trainer.train()


# ------------------------------------------------------------------ 1. atomic save
def save_trials(model_dir: str, work: str, trials: int, rng: random.Random, deadline: float) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 quantization_config=RoSTEConfig(rotation_search="all")).eval()
    ids = sample_ids()
    target = os.path.join(work, "saved")
    w1 = {k: v.clone() for k, v in model.state_dict().items()}
    w2 = {k: v * 1.01 if v.is_floating_point() else v.clone() for k, v in w1.items()}

    def logits_of(folder):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()(ids).logits

    model.load_state_dict(w2)
    model.save_pretrained(os.path.join(work, "v2"))
    v2 = logits_of(os.path.join(work, "v2"))
    model.load_state_dict(w1)
    model.save_pretrained(target)
    v1 = logits_of(target)
    assert not torch.equal(v1, v2)

    from safetensors.torch import save_file

    weights = os.path.join(work, "w2.safetensors")
    save_file({k: v.contiguous() for k, v in w2.items()}, weights)

    results = {"trials": 0, "loaded_v1": 0, "loaded_v2": 0, "failed": [], "killed_while_running": 0,
               "kill_after_s": []}
    for t in range(trials):
        if time.monotonic() > deadline and results["trials"] >= 3:
            break
        marker = os.path.join(work, f"save-marker-{t}")
        pid = _start(_save_child, model_dir, weights, target, marker, False)
        if not _wait_for(marker, pid, 90):
            _kill(pid)
            results["failed"].append(f"trial {t}: the saving child never reached its write")
            continue
        # the slowed write takes ~0.6 s: trial 0 always lands inside it, later ones anywhere (some after the save)
        delay = 0.1 if t == 0 else rng.uniform(0.0, 0.9)
        time.sleep(delay)
        running = _kill(pid)
        results["killed_while_running"] += running
        results["kill_after_s"].append(round(delay, 3) if running else f"{delay:.3f} (finished first)")
        results["trials"] += 1
        try:
            logits = logits_of(target)
        except Exception as exc:  # noqa: BLE001
            results["failed"].append(f"trial {t}: {type(exc).__name__}: {str(exc)[:300]}")
            logits = None
        if logits is not None and torch.equal(logits, v1):
            results["loaded_v1"] += 1
        elif logits is not None and torch.equal(logits, v2):
            results["loaded_v2"] += 1
        elif logits is not None:
            results["failed"].append(f"trial {t}: neither the old nor the new model")
        if logits is None or not torch.equal(logits, v1):  # back to v1 for the next trial
            model.load_state_dict(w1)
            shutil.rmtree(target, ignore_errors=True)
            model.save_pretrained(target)
    results["leftover_tmp_dirs_before_next_save"] = len([n for n in os.listdir(work) if ".roste-tmp-" in n])
    model.save_pretrained(target)  # the next save removes leftovers of killed ones
    results["leftover_tmp_dirs_after_next_save"] = len([n for n in os.listdir(work) if ".roste-tmp-" in n])
    # control: transformers' plain save_pretrained killed mid-write
    marker = os.path.join(work, "save-marker-plain")
    pid = _start(_save_child, model_dir, weights, target, marker, True)
    _wait_for(marker, pid, 90)
    time.sleep(0.2)
    _kill(pid)
    try:
        AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager")
        results["control_plain_save"] = "loaded"
    except Exception as exc:  # noqa: BLE001
        results["control_plain_save"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return results


# ------------------------------------------------------------------ 2. kill -9 during training
class _Marker(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        open(self.path, "w").close()


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def train_trials(model_dir: str, work: str, trials: int, rng: random.Random, deadline: float) -> dict:
    ref = build_trainer(model_dir, os.path.join(work, "ref"), max_steps=8, save_steps=2, per_device=8)
    ref.train()
    ref_losses, ref_layers = _losses(ref), get_state(ref.model).applied["layers"]
    out = {"trials": 0, "passed": 0, "failed": [], "resumed_from": [], "kill_after_s": [], "max_rel_loss_diff": 0.0,
           "exact_losses": True, "reference_layers": ref_layers}
    plans = (["in_checkpoint_write"] + ["random"] * max(0, trials - 1))[:trials]
    for t, plan in enumerate(plans):
        if time.monotonic() > deadline and out["trials"] >= 3:
            break
        run = os.path.join(work, f"run{t}")
        marker = os.path.join(work, f"train-marker-{t}")

        pid = _start(_train_child, model_dir, run, marker, plan)
        if not _wait_for(marker, pid, 120):
            out["failed"].append(f"trial {t}: the child never reached its kill point")
            _kill(pid)
            continue
        delay = 0.3 if plan == "in_checkpoint_write" else rng.uniform(0.0, 1.2)  # 8 steps take ~1.3 s
        time.sleep(delay)
        still_running = _kill(pid)
        out["trials"] += 1
        out["kill_after_s"].append(round(delay, 3) if still_running else f"{delay:.3f} (finished first)")
        last = last_complete_checkpoint(run)
        start = int(last.rsplit("-", 1)[1]) if last else 0
        out["resumed_from"].append(os.path.basename(last) if last else "scratch")
        try:
            if plan == "in_checkpoint_write" and start != 2:
                raise AssertionError(f"killed inside checkpoint-4's write, yet the last complete one is {last}")
            resumed = build_trainer(model_dir, run, max_steps=8, save_steps=2, per_device=8)
            resumed.train(resume_from_checkpoint=True if last else None)
            layers = get_state(resumed.model).applied["layers"]
            if layers != ref_layers:
                raise AssertionError(f"rotation configuration {layers} != {ref_layers}")
            if last:
                saved = json.load(open(os.path.join(last, "roste_state.json")))["rotation_config"]["layers"]
                if saved != ref_layers:
                    raise AssertionError("the checkpoint's roste_state.json holds another rotation configuration")
            again = {k: v for k, v in _losses(resumed).items() if k > start}
            if set(again) != set(range(start + 1, 9)):
                raise AssertionError(f"resumed steps {sorted(again)} (from {start})")
            for step, loss in again.items():
                rel = abs(loss - ref_losses[step]) / max(abs(ref_losses[step]), 1e-12)
                out["max_rel_loss_diff"] = max(out["max_rel_loss_diff"], rel)
                out["exact_losses"] &= loss == ref_losses[step]
                if rel > 1e-4:
                    raise AssertionError(f"step {step}: loss {loss} != reference {ref_losses[step]}")
            out["passed"] += 1
        except Exception as exc:  # noqa: BLE001
            out["failed"].append(f"trial {t} ({plan}, resumed from {last}): {type(exc).__name__}: {exc}")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--save-trials", type=int, default=6)
    p.add_argument("--train-trials", type=int, default=5)
    p.add_argument("--budget", type=float, default=100.0, help="seconds; trials stop (after 3) once it is spent")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    import multiprocessing

    multiprocessing.set_forkserver_preload(["__main__"])  # the fork server imports this script (torch, transformers) once
    rng = random.Random(a.seed)
    start = time.monotonic()
    deadline = start + a.budget
    report = {"seed": a.seed}
    os.makedirs(os.path.join(a.work, "save"))
    report["atomic_save"] = save_trials(a.model, os.path.join(a.work, "save"), a.save_trials, rng, start + a.budget * 0.3)
    report["kill_resume"] = train_trials(a.model, os.path.join(a.work, "train"), a.train_trials, rng, deadline)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    with open(a.report, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
