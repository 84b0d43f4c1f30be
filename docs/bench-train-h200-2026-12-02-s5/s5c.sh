#!/bin/bash
# Session 5, call C: pure bf16 beside bf16-mixed (bench train, this session's build) at both LoRA
# shapes, and the peer (mamba_ssm's module, bf16 autocast) in the same call.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p;/^ours()/p;/^peer()/p' .devbench/run.sh)
xz -dc .devbench/bench5.xz > /tmp/bench && chmod +x /tmp/bench
xz -dc .devbench/cache6.tar.xz | tar xf - && echo "caches restored" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
export NCCL_NVLS_ENABLE=0
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 5"
ours cs_mixed 150 $CS --precision bf16-mixed
ours cs_bf16 200 $CS --precision bf16
ours m_mixed 120 $M --precision bf16-mixed
ours m_bf16 150 $M --precision bf16
peer peer_cs ${PT1:-150} CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=3
peer peer_130m ${PT2:-100} CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=3
