#!/usr/bin/env python3
"""transformers' `generate` on the reference fixtures, for tests/generation.rs.

Run where torch + transformers are installed (the GPU machine of the device tool; it runs on the
CPU in float32), from the repository root:

    python3 scripts/generation_reference.py [--fixtures tests/fixtures]

Writes `<case>/generation.json` for every fixture with greedy continuations of the fixture's
prompt under the decoding options a transformers user reaches for:
  - `plain`: 16 new tokens, no EOS;
  - `eos_stop`: the token greedy decoding makes 4th taken as EOS (generation stops there);
  - `min_new_eos_first`: the first greedy token taken as EOS, `min_new_tokens=12` (EOS would win
    at the first step; transformers suppresses it until 12 new tokens);
  - `min_new_two_eos`: two EOS ids (the 1st and 2nd greedy tokens), `min_new_tokens=5`;
  - `repetition_penalty`: 1.5, 16 new tokens;
  - `batch`: three prompts of different lengths, left-padded with id 0 and an attention mask, 10
    new tokens each (rows as transformers returns them, pads included).
"""

import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM


def gen(model, prompts, **kw):
    """Greedy `generate` of a list of id lists (left-padded with 0 when their lengths differ)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0, **kw)
    return out.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    args = ap.parse_args()
    for case in sorted(os.listdir(args.fixtures)):
        case_dir = os.path.join(args.fixtures, case)
        ref_path = os.path.join(case_dir, "reference.json")
        if not os.path.isfile(ref_path):
            continue
        with open(ref_path) as f:
            ref = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(case_dir, torch_dtype=torch.float32).eval()
        prompt = ref["prompt_ids"]
        n = len(prompt)
        plain = gen(model, [prompt], max_new_tokens=16)[0]
        cases = {"plain": {"eos_token_id": [], "min_new_tokens": 0, "max_new_tokens": 16, "ids": plain}}
        eos = plain[n + 3]
        cases["eos_stop"] = {"eos_token_id": [eos], "min_new_tokens": 0, "max_new_tokens": 16,
                             "ids": gen(model, [prompt], max_new_tokens=16, eos_token_id=eos)[0]}
        eos = plain[n]
        cases["min_new_eos_first"] = {"eos_token_id": [eos], "min_new_tokens": 12, "max_new_tokens": 16,
                                      "ids": gen(model, [prompt], max_new_tokens=16, min_new_tokens=12, eos_token_id=eos)[0]}
        two = [plain[n], plain[n + 1]]
        cases["min_new_two_eos"] = {"eos_token_id": two, "min_new_tokens": 5, "max_new_tokens": 16,
                                    "ids": gen(model, [prompt], max_new_tokens=16, min_new_tokens=5, eos_token_id=two)[0]}
        cases["repetition_penalty"] = {"eos_token_id": [], "min_new_tokens": 0, "max_new_tokens": 16,
                                       "repetition_penalty": 1.5,
                                       "ids": gen(model, [prompt], max_new_tokens=16, repetition_penalty=1.5)[0]}
        rows = ref["input_ids"]
        prompts = [rows[0][:6], rows[1][:3], rows[1][3:12]]
        batch = {"prompts": prompts, "pad_token_id": 0, "max_new_tokens": 10,
                 "rows": gen(model, prompts, max_new_tokens=10),
                 "single": [gen(model, [p], max_new_tokens=10)[0] for p in prompts]}
        out = {"prompt_ids": prompt, "cases": cases, "batch": batch,
               "transformers": transformers.__version__, "torch": torch.__version__}
        with open(os.path.join(case_dir, "generation.json"), "w") as f:
            json.dump(out, f, indent=1)
        same = [r[len(r) - len(s):] == s for r, s in zip(batch["rows"], batch["single"])]
        print(f"{case}: plain {plain[n:]} min_new {cases['min_new_eos_first']['ids'][n:]} batch==single {same}", flush=True)


if __name__ == "__main__":
    main()
