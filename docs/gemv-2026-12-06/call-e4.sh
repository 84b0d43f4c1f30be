#!/bin/bash
# Call E4 (the machine of E3, warm; the same binary): the shipped decode rule beside
# transformers in one call, at the issue's four points (batch 32 at the 7B shape: transformers
# runs out of memory there).
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_130m_b1 40 /tmp/b/bench $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_cs_b1 60 /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
run g_130m_b32 90 /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
