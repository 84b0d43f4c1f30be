#!/bin/bash
# Call E1 (fresh machine): decoding with the vectorised projection kernel (gemv.rs) and the
# pipelined greedy loop (step n + 1 queued before step n's tokens are read back). Each shape on
# both paths of one binary: MAMBA_FUSED_DECODE=on (three launches a layer, the new kernel) and
# off (cubecl's matmuls); transformers beside it.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_130m_b1_auto 60 /tmp/b/bench $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_130m_b32_on 60 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_cs_b1_on 60 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b1_off 60 env MAMBA_FUSED_DECODE=off /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b32_on 60 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run g_cs_b32_off 60 env MAMBA_FUSED_DECODE=off /tmp/b/bench $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run g_130m_b32_off 80 env MAMBA_FUSED_DECODE=off /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_130m_b4_on 40 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $M2 --batch 4 --warmup 1 --iters 3
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
