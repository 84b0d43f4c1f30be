#!/bin/bash
# Session 6, call B: decode speed with the fused Mamba2 step (bench6) beside the session-5 build
# (bench5, the baseline) and transformers' generate, same call: mamba2-130m f32 batch 1 and 32,
# Codestral-7B shape bf16 batch 1 and 32. Prompt 512, 256 new tokens, greedy.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
xz -dc .devbench/bench5.xz > /tmp/bench5 && chmod +x /tmp/bench5
xz -dc .devbench/bench6.xz > /tmp/bench6 && chmod +x /tmp/bench6
xz -dc .devbench/cache6.tar.xz | tar xf - && echo "caches restored" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run new_130m_b1 150 /tmp/bench6 $A --config $M2 --batch 1 --warmup 1 --iters 3
run new_130m_b32 60 /tmp/bench6 $A --config $M2 --batch 32 --warmup 1 --iters 3
run old_130m_b1 60 /tmp/bench5 $A --config $M2 --batch 1 --warmup 1 --iters 3
run old_130m_b32 60 /tmp/bench5 $A --config $M2 --batch 32 --warmup 1 --iters 3
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_130m_b32 60 $H --config $M2 --batch 32 --dtype float32
run new_cs_b1 120 /tmp/bench6 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run new_cs_b32 90 /tmp/bench6 $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 2
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
tar cf - target/autotune target/mamba-kernels-* 2>/dev/null | xz -T16 -3 > $OUT/cache7.tar.xz; ls -la $OUT >> $LOG
