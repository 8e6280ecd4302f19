"""lm-evaluation-harness over an already loaded RoSTE model, on a local task file (no download).

The documented call (docs/evaluation.md):

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=roste_model, tokenizer=tokenizer, batch_size=8)
    simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks/"))
"""

from __future__ import annotations

import json

import pytest
from tiny_data import char_tokenizer, prompt_completion_dataset

pytest.importorskip("lm_eval")

TASK = """task: tiny_add_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
"""
GEN = """output_type: generate_until
generation_kwargs:
  until: ["<eos>"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
LL = """output_type: loglikelihood
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_on_a_roste_model(tiny_checkpoints, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from hf_roste import RoSTEConfig, get_state
    from hf_roste.evaluation import generate_completions

    data = tmp_path / "add.jsonl"
    rows = list(prompt_completion_dataset(6, seed=3))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(TASK.format(kind="gen", data=data) + GEN)
    (tasks / "ll.yaml").write_text(TASK.format(kind="ll", data=data) + LL)

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                 quantization_config=RoSTEConfig(rotation_search="all"))
    assert get_state(model).applied["R1"]
    tok = char_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=64)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_add_gen", "tiny_add_ll"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    res = out["results"]
    assert 0.0 <= res["tiny_add_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["tiny_add_ll"]["acc,none"] <= 1.0
    # lm-eval drives the same fake-quantized forward: its greedy outputs are ours
    theirs = {s["doc"]["prompt"]: s["filtered_resps"][0].strip() for s in out["samples"]["tiny_add_gen"]}
    ours = generate_completions(model, tok, [r["prompt"] for r in rows], max_new_tokens=4, batch_size=3,
                                progress=False)
    assert [theirs[r["prompt"]] for r in rows] == ours
