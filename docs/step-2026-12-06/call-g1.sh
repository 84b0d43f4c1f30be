#!/bin/bash
# Call G1: three builds on one machine: `bench_mid` (code of 41af636: the fused cross-entropy,
# the split op, rank-r LoRA scaling, the one-launch global norm, no zero-filled scan states),
# `bench` (the same plus the one-node LoRA layer with cuBLAS accumulation, code of the commit
# after) against the build before them (`bench_old`, code of 0c7ad04 = calls E3-E5) on one
# machine, mamba_ssm beside them; step time at batch 4 and 8 (is the step bound by the host?);
# a cubecl profile of the new 130m step.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_old bench_mid; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 8 --json"
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
# Most needed first (the call may be cut): ours beside the old build and the peer, then the rest.
run new_130m_bf16 90 /tmp/b/bench train --device cuda $M --batch 8 --precision bf16-mixed
run old_130m_bf16 90 /tmp/b/bench_old train --device cuda $M --batch 8 --precision bf16-mixed
cd .devbench/bench
run peer_130m_amp 200 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=8 python3 peer_mssm.py
cd ../..
run new_7b 120 /tmp/b/bench train --device cuda $CS
run new_130m_f32 60 /tmp/b/bench train --device cuda $M --batch 8 --precision f32
run mid_130m_bf16 60 /tmp/b/bench_mid train --device cuda $M --batch 8 --precision bf16-mixed
run new_130m_bf16_b4 60 /tmp/b/bench train --device cuda $M --batch 4 --precision bf16-mixed
run old_7b 90 /tmp/b/bench_old train --device cuda $CS
root=$PWD; d=/tmp/p_train; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 90 /tmp/b/bench train --device cuda --config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 2 --precision bf16-mixed > $d/out 2> $d/err); echo "== prof train rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 3 > $OUT/prof_train_130m.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_train_130m.log.xz
