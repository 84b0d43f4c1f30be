#!/bin/bash
# Call I3b: call I3 cut to what ~200 s of device time allows (three of I3's requests were
# refused): issue 16's decoding with `bench_step2` (e8ec699's code) beside transformers, the
# Codestral-7B shape first, then mamba2-130m; the projection kernel rolled last.
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
run g_cs_b1 30 /tmp/b/bench_step2 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run hf_cs_b1 50 $H --config $CS --batch 1 --dtype bfloat16
run g_130m_b32 60 /tmp/b/bench_step2 $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_130m_b1 15 /tmp/b/bench_step2 $A --config $M2 --batch 1 --warmup 1 --iters 3
run hf_130m_b1 30 $H --config $M2 --batch 1 --dtype float32
run g_cs_b32 20 /tmp/b/bench_step2 $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run g_cs_b1_rolled 20 env MAMBA_GEMV_UNROLL=off /tmp/b/bench_step2 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
