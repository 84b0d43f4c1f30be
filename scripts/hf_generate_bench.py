#!/usr/bin/env python3
"""transformers' `generate` decoding speed, the reference for `bench generate`.

Run on the GPU machine from the repository root:

    python3 scripts/hf_generate_bench.py --config configs/models/mamba2-130m-hf.json \
        --batch 1 --prompt-len 512 --new-tokens 256 --dtype float32

A randomly initialised `*ForCausalLM` from the config (on the GPU), random prompts, greedy,
`use_cache=True`, EOS off (`min_new_tokens = max_new_tokens`). Prints one JSON line: the prefill
time (a generation of one new token), per-token decode time over the remaining steps, tokens/s,
and whether transformers took its CUDA-kernel path (mamba_ssm / causal_conv1d) or the torch one.
"""

import argparse
import json
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int, default=2)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    cfg = AutoConfig.from_pretrained(a.config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_len), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == a.prompt_len + n
        return (time.perf_counter() - t) * 1e3

    t0 = time.perf_counter()
    gen(a.new_tokens)
    first = time.perf_counter() - t0
    prefill = sorted(gen(1) for _ in range(a.iters))[a.iters // 2]
    full = sorted(gen(a.new_tokens) for _ in range(a.iters))[a.iters // 2]
    per = max(full - prefill, 0.0) / (a.new_tokens - 1)
    fast = None
    try:
        mod = __import__(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}", fromlist=["x"])
        fast = bool(getattr(mod, "is_fast_path_available", None))
    except Exception:
        pass
    print(json.dumps({
        "bench": "hf_generate", "config": a.config, "model_type": cfg.model_type, "batch": a.batch,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "dtype": a.dtype,
        "first_run_s": first, "prefill_ms": prefill, "decode_ms_per_token": per,
        "decode_tokens_per_s": a.batch / (per / 1e3), "end_to_end_tokens_per_s": a.batch * a.new_tokens / (full / 1e3),
        "cuda_kernel_path": fast, "transformers": transformers.__version__, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
    }), flush=True)


if __name__ == "__main__":
    main()
