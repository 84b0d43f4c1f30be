#!/usr/bin/env python3
"""Load a LoRA adapter and a merged export written by mamba-burn's `train` with transformers +
PEFT, and compare their losses with the ones mamba-burn's `eval` printed.

    python3 scripts/check_peft.py <dir> <ours.json>

<dir> holds base/ (the base model), adapter/ (PEFT files), merged/ (transformers format) and
ids.json; <ours.json> maps "base", "adapter", "merged" to mamba-burn's losses on those ids.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

root, ours_path = sys.argv[1], sys.argv[2]
ours = json.load(open(ours_path))
ids = torch.tensor(json.load(open(f"{root}/ids.json")))


def loss_of(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


# PEFT >= 0.21 refuses LoRA on `out_proj`/`conv1d` of Mamba models, because mamba_ssm's fused
# kernel reads those weights directly and would bypass the adapter. Without mamba_ssm installed
# transformers runs its PyTorch path, which does call `out_proj`, so the adapter applies; lift the
# guard (and say so) to compare numbers.
import peft.tuners.tuners_utils as tu

if hasattr(tu, "_check_lora_target_modules_mamba"):
    try:
        import mamba_ssm  # noqa: F401

        print("mamba_ssm is installed: PEFT's out_proj guard stays on")
    except ImportError:
        tu._check_lora_target_modules_mamba = lambda *a, **k: None
        print("note: PEFT's Mamba out_proj/conv1d guard lifted (PyTorch path, no fused kernels)")

base = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32)
theirs = {"base": loss_of(base)}
peft_model = PeftModel.from_pretrained(base, f"{root}/adapter")
n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
theirs["adapter"] = loss_of(peft_model)
theirs["peft_merge_and_unload"] = loss_of(peft_model.merge_and_unload())
theirs["merged"] = loss_of(AutoModelForCausalLM.from_pretrained(f"{root}/merged", dtype=torch.float32))
print(f"PEFT found {n_lora} LoRA tensors")
bad = 0
print(f"{'model':24} {'transformers+PEFT':>18} {'mamba-burn':>14} {'rel':>10}")
for k, v in theirs.items():
    o = ours.get(k)
    if o is None:
        print(f"{k:24} {v:18.8f} {'-':>14}")
        continue
    rel = abs(v - o) / abs(v)
    bad += rel > 1e-5
    print(f"{k:24} {v:18.8f} {o:14.8f} {rel:10.2e} {'ok' if rel <= 1e-5 else 'MISMATCH'}")
sys.exit(1 if bad else 0)
