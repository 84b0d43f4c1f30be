#!/bin/bash
# Call B (the machine of call A, still warm): the peer (mamba_ssm's Mamba2 module) at both bench
# shapes beside our tensor-core build's steps in the same call.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 5"
run cs_tc 120 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
run m_tc 60 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
cd .devbench/bench
run peer_cs 240 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 peer_mssm.py
run peer_m 240 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=0 ITERS=10 python3 peer_mssm.py
