#!/bin/bash
# Call E5 (fresh machine): the projection kernel whose norm prologue spreads a (row, norm group)
# pair over up to all eight thread groups with four loads in flight a lane (it was one group of
# 32 lanes walking the row one load at a time), at the two batch-1 points, transformers beside.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_cs_b1 60 /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_130m_b1 40 /tmp/b/bench $A --config $M2 --batch 1 --warmup 1 --iters 3
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run g_cs_b1_again 40 /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
