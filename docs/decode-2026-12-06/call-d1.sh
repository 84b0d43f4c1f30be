#!/bin/bash
# Call D1 (fresh machine): the build that sends products under 1 GFLOP to cubecl's matmul
# (MAMBA_CUBLAS_MIN_FLOP, default 1e9) instead of cuBLAS. The main job's first step cold and warm
# (small products are autotuned again), decoding at both shapes, transformers beside it.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
LJ="--config configs/lora.toml --set model.source= --set model.init=configs/models/mamba-130m-hf.json --set tokenizer.source=tokenizers/gpt-neox-20b/tokenizer.json --set data.source=datasets/english_quotes/quotes.jsonl --set data.file= --set train.steps=30 --set train.eval_every=30 --set train.checkpoint_every=0 --set train.log_every=10 --set output.export_merged=false --device cuda"
run job_cold 150 /tmp/b/train $LJ --set output.dir=/tmp/r_cold
run job_warm 60 /tmp/b/train $LJ --set output.dir=/tmp/r_warm
cp /tmp/r_cold/metrics.jsonl $OUT/metrics_cold.jsonl; cp /tmp/r_warm/metrics.jsonl $OUT/metrics_warm.jsonl
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_130m_b1 60 /tmp/b/bench $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_130m_b32 60 /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_cs_b1 90 /tmp/b/bench $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b32 90 /tmp/b/bench $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
