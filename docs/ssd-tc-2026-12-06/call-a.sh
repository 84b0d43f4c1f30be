#!/bin/bash
# Call A: the SSD contractions on the tensor cores (TF32 wmma) against the CUDA-core path
# (MAMBA_SSD_TENSOR_CORES=0), same binary, same machine: the SSD op against f64 at the three
# bench shapes, a whole model's loss and gradients against the reference, and whole LoRA steps at
# both bench shapes.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
echo "cublas: ${CUBLAS:-none}; cupti: ${CUPTI:-none}" >> $LOG
K="kernels --device cuda --only ssd --truth-f64 --iters 10 --json"
run k_tc 150 /tmp/b/bench $K
run k_plain 150 env MAMBA_SSD_TENSOR_CORES=0 /tmp/b/bench $K
run model_tc 90 /tmp/b/bench model --device cuda --json
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 5"
run cs_tc 120 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
run cs_plain 120 env MAMBA_SSD_TENSOR_CORES=0 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
run m_tc 60 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_plain 60 env MAMBA_SSD_TENSOR_CORES=0 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_f32_tc 60 /tmp/b/bench train --device cuda $M --precision f32 --json
