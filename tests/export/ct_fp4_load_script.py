"""Run in a subprocess by test_ct_fp4_export.py: load an FP4 compressed-tensors export with PLAIN transformers.

argv: export_dir ids.pt out.pt drop_act(0/1) drop_kv(0/1). Loads in bfloat16 (compressed-tensors decompresses
NVFP4 / MXFP4 weights to bfloat16), applies the online R4 with compressed-tensors' `apply_transform_config`
(transformers does not apply `transform_config`), and saves the logits and every decompressed Linear weight.
hf_roste is never imported (checked).
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

src, ids_path, res_path = sys.argv[1:4]
drop_act, drop_kv = (a == "1" for a in sys.argv[4:6])
folder = os.path.join(tempfile.mkdtemp(), "m")
shutil.copytree(src, folder)
cfg = json.load(open(os.path.join(folder, "config.json")))
qc = cfg["quantization_config"]
if drop_act:
    qc["config_groups"]["group_0"]["input_activations"] = None
if drop_kv:
    qc["kv_cache_scheme"] = None
json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager",
                                                   output_loading_info=True)
model.eval()
if qc.get("transform_config"):
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    tc = TransformConfig.model_validate(qc["transform_config"])
    for scheme in tc.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.location == "input"]
    apply_transform_config(model, tc)
with torch.no_grad():
    logits = model(torch.load(ids_path)).logits
weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n != "lm_head"}
torch.save({"logits": logits, "weights": weights}, res_path)
print(json.dumps({"hf_roste_imported": "hf_roste" in sys.modules,
                  "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"])}))
