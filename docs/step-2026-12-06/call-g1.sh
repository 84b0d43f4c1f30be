#!/bin/bash
# Call G1: the fused cross-entropy, the split op, rank-r LoRA scaling, the one-launch global
# norm and no zero-filled scan states (new `bench`, code of 41af636) against the build before them (`bench_old`, code of 0c7ad04 = calls E3-E5) on one
# machine, mamba_ssm beside them; step time at batch 4 and 8 (is the step bound by the host?);
# a cubecl profile of the new 130m step.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
[ -x /tmp/b/bench_old ] || { xz -dc .devbench/bench_old.xz > /tmp/b/bench_old && chmod +x /tmp/b/bench_old; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 8 --json"
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
run new_130m_bf16 90 /tmp/b/bench train --device cuda $M --batch 8 --precision bf16-mixed
run old_130m_bf16 90 /tmp/b/bench_old train --device cuda $M --batch 8 --precision bf16-mixed
run new_130m_f32 60 /tmp/b/bench train --device cuda $M --batch 8 --precision f32
run new_130m_bf16_b4 60 /tmp/b/bench train --device cuda $M --batch 4 --precision bf16-mixed
run new_7b 120 /tmp/b/bench train --device cuda $CS
run old_7b 90 /tmp/b/bench_old train --device cuda $CS
cd .devbench/bench
run peer_130m_amp 200 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=8 python3 peer_mssm.py
cd ../..
root=$PWD; d=/tmp/p_train; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 90 /tmp/b/bench train --device cuda --config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 2 --precision bf16-mixed > $d/out 2> $d/err); echo "== prof train rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 3 > $OUT/prof_train_130m.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_train_130m.log.xz
