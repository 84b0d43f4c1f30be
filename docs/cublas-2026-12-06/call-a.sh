#!/bin/bash
# Call A (cold machine): the main job's first step cold and warm with cuBLAS products, the
# products themselves (bench gemm), and whole LoRA steps at both bench shapes (bench train).
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
echo "cublas: ${CUBLAS:-none}" >> $LOG
LJ="--config configs/lora.toml --set model.source= --set model.init=configs/models/mamba-130m-hf.json --set tokenizer.source=tokenizers/gpt-neox-20b/tokenizer.json --set data.source=datasets/english_quotes/quotes.jsonl --set data.file= --set train.steps=30 --set train.eval_every=30 --set train.checkpoint_every=0 --set train.log_every=10 --set output.export_merged=false --device cuda"
# First, that cuBLAS is found and agrees with f64 (no cubecl matmul runs: --skip-burn).
run gemm_check 60 /tmp/b/bench gemm --device cuda --shapes small --dtypes f32,bf16 --skip-burn --json
if ! grep -q "\"provider\":\"cublas\"" /tmp/o/gemm_check.out; then
  echo "cuBLAS not used; stopping" >> $LOG; ldconfig -p | grep -i cublas >> $LOG
  find / -name 'libcublas*' 2>/dev/null | head >> $LOG; exit 1
fi
run job_cold 240 /tmp/b/train $LJ --set output.dir=/tmp/r_cold
run job_warm 90 /tmp/b/train $LJ --set output.dir=/tmp/r_warm
cp /tmp/r_cold/metrics.jsonl $OUT/metrics_cold.jsonl; cp /tmp/r_warm/metrics.jsonl $OUT/metrics_warm.jsonl
run gemm_small 60 /tmp/b/bench gemm --device cuda --shapes small --dtypes f32,bf16 --json
run gemm_step 150 /tmp/b/bench gemm --device cuda --shapes step --dtypes bf16,f32 --skip-burn --json
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4"
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 5"
run m_mixed 120 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_f32 90 /tmp/b/bench train --device cuda $M --precision f32 --json
run cs_mixed 150 /tmp/b/bench train --device cuda $CS --precision bf16-mixed --json
tar cf - target/autotune target/mamba-kernels-* 2>/dev/null | xz -1 > $OUT/cache.tar.xz
