#!/bin/bash
# Session 5, call A: the data-parallel path on CUDA, two replicas on the one H200
# (`cuda:0,cuda:0`) beside one device, same job, same call; then the Codestral-shape LoRA job as
# issue 18 will run it (global batch 8 = 4 x 2048 per replica). Caches saved for call B.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
xz -dc .devbench/train5.xz > /tmp/train && chmod +x /tmp/train
xz -dc .devbench/cache5.tar.xz | tar xf - && echo "caches restored" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
export NCCL_NVLS_ENABLE=0
LJ="--config configs/lora.toml --set model.source= --set model.init=configs/models/mamba-130m-hf.json --set tokenizer.source=tokenizers/gpt-neox-20b/tokenizer.json --set data.source=datasets/english_quotes/quotes.jsonl --set data.file= --set train.steps=30 --set train.eval_every=30 --set train.checkpoint_every=0 --set train.log_every=1 --set output.export_merged=false"
run lora_one ${T1:-150} /tmp/train $LJ --device cuda --set output.dir=/tmp/r_one
run lora_two ${T2:-150} /tmp/train $LJ --device cuda:0,cuda:0 --set output.dir=/tmp/r_two
for r in one two; do cp /tmp/r_$r/metrics.jsonl $OUT/metrics_lora_$r.jsonl 2>/dev/null; done
CS="--config configs/lora-codestral-shape.toml --set train.batch_size=8 --set train.steps=${CS_STEPS:-4} --set train.checkpoint_every=0"
run cs_two ${T3:-240} /tmp/train $CS --device cuda:0,cuda:0 --set output.dir=/tmp/cs_two
cp /tmp/cs_two/metrics.jsonl $OUT/metrics_cs_two.jsonl 2>/dev/null
tar cf - target/autotune target/mamba-kernels-* | xz -T16 -6 > $OUT/cache6.tar.xz; ls -la $OUT/cache6.tar.xz >> $LOG
