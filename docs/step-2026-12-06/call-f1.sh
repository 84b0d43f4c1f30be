#!/bin/bash
# Call F1: is the 130m LoRA step bound by the device or by the host issuing it? Same release
# `bench` as calls E3-E5 (code of 0c7ad04). Step time at batch 4, 8, 16 (a host-bound step
# costs about the same at each), then cubecl's per-launch profile of the batch-8 step with the
# one-launch AdamW (the last profile, E2, predates it). nsys/ncu presence noted.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
which nsys ncu >> $LOG 2>&1
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 6 --precision bf16-mixed --json"
run m_b8 90 /tmp/b/bench train --device cuda $M --batch 8
run m_b4 60 /tmp/b/bench train --device cuda $M --batch 4
run m_b16 60 /tmp/b/bench train --device cuda $M --batch 16
run m_b2 60 /tmp/b/bench train --device cuda $M --batch 2
root=$PWD; d=/tmp/p_train; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 90 /tmp/b/bench train --device cuda --config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 2 --precision bf16-mixed > $d/out 2> $d/err); echo "== prof train rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 3 > $OUT/prof_train_130m.json 2>> $LOG
grep -c . $d/prof.log >> $LOG
xz -c $d/prof.log > $OUT/prof_train_130m.log.xz; ls -la $d >> $LOG
