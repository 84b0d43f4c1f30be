#!/bin/bash
# Call I3 (issue 16 again, then issue 14's SSD slabs): `bench_step2`, the fused Mamba2 step
# loading a pass's 16 state rows before storing any (one memory latency a pass instead of one a
# row) and summing rows in two stages, and the projection kernel's loop over a slab's weights
# unrolled (MAMBA_GEMV_UNROLL=off: rolled, as before), decoding mamba2-130m and the Codestral-7B shape at batch
# 1 and 32, prompt 512, 256 new tokens, transformers' `generate` beside it; then the 130m LoRA
# step with the SSD tile kernels' slabs in up to four parts (the default) and in one
# (MAMBA_SSD_SLAB_PARTS=1, the staging before 0816199).
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_step2; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_130m_b32 90 /tmp/b/bench_step2 $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_130m_b1 30 /tmp/b/bench_step2 $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_cs_b1 40 /tmp/b/bench_step2 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b32 40 /tmp/b/bench_step2 $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run g_cs_b1_rolled 40 env MAMBA_GEMV_UNROLL=off /tmp/b/bench_step2 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_130m_b1_rolled 30 env MAMBA_GEMV_UNROLL=off /tmp/b/bench_step2 $A --config $M2 --batch 1 --warmup 1 --iters 3
run hf_130m_b1 50 $H --config $M2 --batch 1 --dtype float32
run hf_cs_b1 70 $H --config $CS --batch 1 --dtype bfloat16
run hf_130m_b32 30 $H --config $M2 --batch 32 --dtype float32
run hf_cs_b32 30 $H --config $CS --batch 32 --dtype bfloat16
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
run t_p4 150 /tmp/b/bench_step2 $M
run t_p1 60 env MAMBA_SSD_SLAB_PARTS=1 /tmp/b/bench_step2 $M
