#!/bin/bash
# Call D2 (the machine of D1, warm): training steps with the 1-GFLOP rule against every product on
# cuBLAS (MAMBA_CUBLAS_MIN_FLOP=0, the previous build's behaviour), then the peer at the 7B shape.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 8"
run m_rule 90 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_all 60 env MAMBA_CUBLAS_MIN_FLOP=0 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_f32_rule 60 /tmp/b/bench train --device cuda $M --precision f32 --json
run cs_rule 150 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
run cs_all 100 env MAMBA_CUBLAS_MIN_FLOP=0 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
cd .devbench/bench
run peer_cs 230 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 peer_mssm.py
