"""Run in a subprocess by test_ct_export.py: load a compressed-tensors export with PLAIN transformers.

argv: export_dir ids.pt out.pt drop_act(0/1) drop_kv(0/1) apply_r4(0/1). Optional config edits are made on a
copy. hf_roste is never imported (checked). The online R4 is applied, when asked, with compressed-tensors'
own `apply_transform_config` restricted to the online (`input`) entries, because transformers 5.23 does not
apply `transform_config` at all.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

src, ids_path, res_path = sys.argv[1:4]
drop_act, drop_kv, apply_r4 = (a == "1" for a in sys.argv[4:7])
folder = os.path.join(tempfile.mkdtemp(), "m")
shutil.copytree(src, folder)
cfg = json.load(open(os.path.join(folder, "config.json")))
qc = cfg["quantization_config"]
if drop_act:
    qc["config_groups"]["group_0"]["input_activations"] = None
if drop_kv:
    qc["kv_cache_scheme"] = None
json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                   output_loading_info=True)
model.eval()
if apply_r4 and qc.get("transform_config"):
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    tc = TransformConfig.model_validate(qc["transform_config"])
    for scheme in tc.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.location == "input"]
    apply_transform_config(model, tc)
with torch.no_grad():
    logits = model(torch.load(ids_path)).logits
torch.save(logits, res_path)
print(json.dumps({"hf_roste_imported": "hf_roste" in sys.modules,
                  "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"])}))
