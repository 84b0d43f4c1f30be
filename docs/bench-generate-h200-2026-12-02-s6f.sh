#!/bin/bash
# Session 6, call F (same warm machine as D and E): bench9 at mamba2-130m again beside
# transformers, to see the run-to-run spread of the batch-1 figure.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
[ -x /tmp/bench9 ] || { xz -dc .devbench/bench9.xz > /tmp/bench9 && chmod +x /tmp/bench9; }
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run b9_130m_b1_a 60 /tmp/bench9 $A --config $M2 --batch 1 --warmup 1 --iters 5
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run b9_130m_b1_b 60 /tmp/bench9 $A --config $M2 --batch 1 --warmup 1 --iters 5
run b9_130m_b32 60 /tmp/bench9 $A --config $M2 --batch 32 --warmup 1 --iters 3
