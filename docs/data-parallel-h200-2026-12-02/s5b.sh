#!/bin/bash
# Session 5, call B: the single-GPU baseline of the issue-18 job with the train binary
# (Codestral-7B shape, LoRA r8, 4 x 2048, checkpointing, bf16-mixed), and the same global batch
# of 8 on one replica, to set beside call A's two replicas.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
xz -dc .devbench/train5.xz > /tmp/train && chmod +x /tmp/train
xz -dc .devbench/cache6.tar.xz | tar xf - && echo "call A's caches restored" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
CS="--config configs/lora-codestral-shape.toml --set train.steps=${CS_STEPS:-4} --set train.checkpoint_every=0 --device cuda"
run cs_one_b4 ${T1:-200} /tmp/train $CS --set train.batch_size=4 --set output.dir=/tmp/cs_one4
run cs_one_b8 ${T2:-200} /tmp/train $CS --set train.batch_size=8 --set output.dir=/tmp/cs_one8
cp /tmp/cs_one4/metrics.jsonl $OUT/metrics_cs_one4.jsonl 2>/dev/null
cp /tmp/cs_one8/metrics.jsonl $OUT/metrics_cs_one8.jsonl 2>/dev/null
