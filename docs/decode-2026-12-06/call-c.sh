#!/bin/bash
# Call C (the machine of calls A and B): decoding with the build whose unfused decode step runs
# its projections on cuBLAS (batch > 4, or the 7B shape), beside transformers' generate in the
# same call. Prompt 512, 256 new tokens, greedy, random weights.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_130m_b1 90 /tmp/b/bench $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_130m_b32 60 /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_130m_b32_fused 60 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_cs_b1 120 /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b32 100 /tmp/b/bench $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_130m_b32 60 $H --config $M2 --batch 32 --dtype float32
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
