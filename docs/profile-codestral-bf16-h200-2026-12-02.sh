#!/bin/bash
# Session 6, call A: cubecl kernel profiles of the training step at both issue-14 shapes
# (bf16-mixed LoRA), warm caches, plus the steady runs they are read against.
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
xz -dc .devbench/bench5.xz > /tmp/bench && chmod +x /tmp/bench
xz -dc .devbench/cache6.tar.xz | tar xf - && echo "caches restored" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
root=$PWD
prof() { # name steps bench-train-args...
  local name=$1 steps=$2; shift 2
  local d=/tmp/p_$name; mkdir -p $d
  printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
  local t0=$(date +%s)
  (cd $d && timeout 240 /tmp/bench train --device cuda "$@" --warmup 0 --steps $((steps-1)) --json > $d/out 2> $d/err); echo "== prof $name rc=$? $(( $(date +%s)-t0 ))s" >> $LOG
  tail -c 600 $d/err >> $LOG; cat $d/out >> $LOG
  python3 scripts/profile_summary.py $d/prof.log $steps > $OUT/prof_$name.json 2>> $LOG; head -c 2500 $OUT/prof_$name.json >> $LOG; echo >> $LOG
  grep -c . $d/prof.log >> $LOG
  xz -T8 -c $d/prof.log > $OUT/prof_$name.log.xz
}
CS=$root/configs/models/mamba-codestral-7b-shape.json
prof cs_bf16 3 --config $CS --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --precision bf16-mixed
prof 130m_bf16 3 --config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --precision bf16-mixed
ls -la $OUT >> $LOG
