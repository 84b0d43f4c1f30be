"""torch's bf16-autocast loss on the transformers fixtures, beside the f32 loss of the same
checkpoint, for the `bf16-mixed` accuracy guard in tests/precision.rs.

Run on a CUDA machine from the repository root:

    python3 scripts/autocast_reference.py [--fixtures tests/fixtures]

Writes `<case>/autocast.json` for every fixture: the f32 loss, the loss under
`torch.autocast("cuda", dtype=torch.bfloat16)` (f32 weights, bf16 matmuls: what PyTorch users
train with, and what mamba_ssm advises), the versions and the device.
"""

import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    args = ap.parse_args()
    dev = "cuda"
    for case in sorted(os.listdir(args.fixtures)):
        case_dir = os.path.join(args.fixtures, case)
        ref_path = os.path.join(case_dir, "reference.json")
        if not os.path.isfile(ref_path):
            continue
        with open(ref_path) as f:
            ref = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(case_dir, torch_dtype=torch.float32).to(dev).eval()
        ids = torch.tensor(ref["input_ids"], device=dev)
        labels = torch.tensor(ref["labels"], device=dev)
        with torch.no_grad():
            f32 = model(input_ids=ids, labels=labels).loss.item()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = model(input_ids=ids, labels=labels).loss.float().item()
        out = {
            "loss_f32": f32,
            "loss_bf16_autocast": bf16,
            "rel_err": abs(bf16 - f32) / abs(f32),
            "fixture_loss": ref["loss"],
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0),
        }
        with open(os.path.join(case_dir, "autocast.json"), "w") as f:
            json.dump(out, f, indent=1)
        print(f"{case}: f32 {f32:.6f} autocast-bf16 {bf16:.6f} rel {out['rel_err']:.2e}", flush=True)


if __name__ == "__main__":
    main()
