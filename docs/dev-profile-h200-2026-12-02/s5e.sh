#!/bin/bash
# Session 5, call E: the main job through the dev-profile binary (what `cargo run` without
# --release builds: dependencies at opt-level 3, ours at 1) beside the release binary, same call.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
xz -dc .devbench/train5.xz > /tmp/train && chmod +x /tmp/train
xz -dc .devbench/train_dev.xz > /tmp/train_dev && chmod +x /tmp/train_dev
xz -dc .devbench/cache6.tar.xz | tar xf - && echo "caches restored" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
LJ="--config configs/lora.toml --set model.source= --set model.init=configs/models/mamba-130m-hf.json --set tokenizer.source=tokenizers/gpt-neox-20b/tokenizer.json --set data.source=datasets/english_quotes/quotes.jsonl --set data.file= --set train.steps=30 --set train.eval_every=30 --set train.checkpoint_every=0 --set train.log_every=10 --set output.export_merged=false --device cuda"
run job_release 150 /tmp/train $LJ --set output.dir=/tmp/r_rel
run job_dev 240 /tmp/train_dev $LJ --set output.dir=/tmp/r_dev
for r in rel dev; do cp /tmp/r_$r/metrics.jsonl $OUT/metrics_$r.jsonl 2>/dev/null; done
