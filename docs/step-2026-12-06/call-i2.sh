#!/bin/bash
# Call I2 (issue 16's closing measurement, then issue 14's SSD kernels): `bench generate` with the
# build that decodes with the coalesced fused step (469844e) and stages SSD slabs in parts
# (`bench_parts`), mamba2-130m and the Codestral-7B shape at batch 1 and 32, prompt 512, 256 new
# tokens, transformers' `generate` beside it in the same call; then the SSD kernel benchmark
# with MAMBA_SSD_SLAB_PARTS=1 (the old staging) and the default.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_parts; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_130m_b32 90 /tmp/b/bench_parts $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_130m_b1 40 /tmp/b/bench_parts $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_cs_b1 40 /tmp/b/bench_parts $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b32 40 /tmp/b/bench_parts $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_130m_b32 60 $H --config $M2 --batch 32 --dtype float32
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
run hf_cs_b32 60 $H --config $CS --batch 32 --dtype bfloat16
K="kernels --device cuda --shapes bench --only ssd --json"
run k_p4 90 /tmp/b/bench_parts $K
run k_p1 50 env MAMBA_SSD_SLAB_PARTS=1 /tmp/b/bench_parts $K
