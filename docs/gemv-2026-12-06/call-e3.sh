#!/bin/bash
# Call E3 (fresh machine): the build with the one-launch AdamW (crates/mamba-train/src/optim.rs)
# and the decode rule that takes the 7B shape's batch 1 through the three-launch path: our 130m
# LoRA step beside mamba_ssm's AMP run (its f32 run is call E2's), the 7B-shape LoRA step, and
# the shipped decode rule at the two batch-1 shapes.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 8"
CSJ=configs/models/mamba-codestral-7b-shape.json
CS="--config $CSJ --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
run m_bf16 90 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_f32 60 /tmp/b/bench train --device cuda $M --precision f32 --json
run g_cs_b1_auto 60 /tmp/b/bench $A --config $CSJ --batch 1 --precision bf16 --warmup 1 --iters 2
run g_130m_b1_auto 40 /tmp/b/bench $A --config configs/models/mamba2-130m-hf.json --batch 1 --warmup 1 --iters 3
run cs_bf16 150 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
cd .devbench/bench
run peer_130m_amp 230 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=8 python3 peer_mssm.py
