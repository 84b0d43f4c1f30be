#!/bin/bash
# Call C (fresh machine): cuBLAS on cubecl's stream (read through CUPTI). The main job's first
# step cold and warm, the products checked against f64, whole LoRA steps at both bench shapes.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
echo "cublas: ${CUBLAS:-none}; cupti: ${CUPTI:-none}" >> $LOG
LJ="--config configs/lora.toml --set model.source= --set model.init=configs/models/mamba-130m-hf.json --set tokenizer.source=tokenizers/gpt-neox-20b/tokenizer.json --set data.source=datasets/english_quotes/quotes.jsonl --set data.file= --set train.steps=30 --set train.eval_every=30 --set train.checkpoint_every=0 --set train.log_every=10 --set output.export_merged=false --device cuda"
run gemm_check 60 /tmp/b/bench gemm --device cuda --shapes small --dtypes f32,bf16 --skip-burn --json
grep -q '"provider":"cublas' /tmp/o/gemm_check.out || { echo "cuBLAS not used; stopping" >> $LOG; exit 1; }
run job_cold 120 /tmp/b/train $LJ --set output.dir=/tmp/r_cold
run job_warm 60 /tmp/b/train $LJ --set output.dir=/tmp/r_warm
cp /tmp/r_cold/metrics.jsonl $OUT/metrics_cold.jsonl; cp /tmp/r_warm/metrics.jsonl $OUT/metrics_warm.jsonl
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 5"
run m_mixed 90 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_f32 90 /tmp/b/bench train --device cuda $M --precision f32 --json
run cs_mixed 120 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
