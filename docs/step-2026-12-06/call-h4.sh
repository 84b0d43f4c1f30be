#!/bin/bash
# Call H4 (issue 16): decoding with the fused Mamba2 step's phase 2 across the state index
# (`bench_step`, coalesced loads and stores) against the build before (`bench_cat`), mamba2-130m,
# prompt 512, 256 new tokens, batch 32 and 1, on one machine.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_cat bench_step; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
A="generate --device cuda --config configs/models/mamba2-130m-hf.json --prompt-len 512 --new-tokens 256 --json"
run step_b32 120 /tmp/b/bench_step $A --batch 32 --warmup 1 --iters 3
run cat_b32 90 /tmp/b/bench_cat $A --batch 32 --warmup 1 --iters 3
run step_b32_again 60 /tmp/b/bench_step $A --batch 32 --warmup 1 --iters 3
run step_b1 60 /tmp/b/bench_step $A --batch 1 --warmup 1 --iters 3
run cat_b1 60 /tmp/b/bench_cat $A --batch 1 --warmup 1 --iters 3
run step_b32_bf16 60 /tmp/b/bench_step $A --batch 32 --warmup 1 --iters 3 --precision bf16
