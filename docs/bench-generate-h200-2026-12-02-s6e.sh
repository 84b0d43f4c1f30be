#!/bin/bash
# Session 6, call E (call D's script with its transformers runs commented out, run again on the same warm machine after call D could not unpack bench9): decode speed of the closing build (bench9: the three-launch fused step for
# small models at batches up to 4, the add-norm path otherwise) beside transformers' generate,
# same call: mamba2-130m f32 at batch 1, 4 and 32; Codestral-7B shape bf16 at batch 1 and 32.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
xz -dc .devbench/bench9.xz > /tmp/bench9 && chmod +x /tmp/bench9
xz -dc .devbench/cache8.tar.xz | tar xf - && echo "caches restored (call C's)" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run b9_130m_b1 150 /tmp/bench9 $A --config $M2 --batch 1 --warmup 1 --iters 3
run b9_130m_b4 60 /tmp/bench9 $A --config $M2 --batch 4 --warmup 1 --iters 3
run b9_130m_b32 60 /tmp/bench9 $A --config $M2 --batch 32 --warmup 1 --iters 3
#run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
#run hf_130m_b32 60 $H --config $M2 --batch 32 --dtype float32
run b9_cs_b1 120 /tmp/bench9 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run b9_cs_b32 100 /tmp/bench9 $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
#run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
ls -la $OUT >> $LOG
