#!/bin/bash
# Call I1 (issue 16): decoding with HEAD's build (`bench_head`, ec26560: the fused Mamba2 step's
# phase 2 across the state index) against the build before the step rewrite (`bench_cat`,
# 799db56), mamba2-130m at batch 32 and 1, then HEAD at the Codestral-7B shape, one machine.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_cat bench_head; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2="--config configs/models/mamba2-130m-hf.json"
CS="--config configs/models/mamba-codestral-7b-shape.json --precision bf16"
run head_b32 150 /tmp/b/bench_head $A $M2 --batch 32 --warmup 1 --iters 3
run cat_b32 70 /tmp/b/bench_cat $A $M2 --batch 32 --warmup 1 --iters 3
run head_b1 50 /tmp/b/bench_head $A $M2 --batch 1 --warmup 1 --iters 3
run cat_b1 40 /tmp/b/bench_cat $A $M2 --batch 1 --warmup 1 --iters 3
run head_b32_bf16 50 /tmp/b/bench_head $A $M2 --batch 32 --warmup 1 --iters 3 --precision bf16
run head_cs_b1 70 /tmp/b/bench_head $A $CS --batch 1 --warmup 1 --iters 2
run head_cs_b32 60 /tmp/b/bench_head $A $CS --batch 32 --warmup 1 --iters 1
