#!/usr/bin/env python3
"""Load checkpoints written by mamba-burn (examples/export_roundtrip.rs) in transformers and
compare transformers' loss with ours. Prints a table and exits non-zero on a mismatch."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

root = sys.argv[1]
cases = json.load(open(f"{root}/cases.json"))
bad = 0
print(f"{'case':34} {'transformers':>14} {'mamba-burn':>14} {'rel':>10}")
for c in cases:
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{c['name']}", dtype=torch.float32).eval()
    ids = torch.tensor(c["ids"])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    rel = abs(loss - c["loss"]) / abs(loss)
    ok = rel <= 1e-5
    bad += not ok
    print(f"{c['name']:34} {loss:14.8f} {c['loss']:14.8f} {rel:10.2e} {'ok' if ok else 'MISMATCH'}")
sys.exit(1 if bad else 0)
