#!/bin/bash
# Call J1 (issue 14): the training step of `bench_j` (c1be27e's code: SSD slabs staged in up to
# four parts, the SSD backward's reductions folded into its kernels) at both of issue 14's shapes,
# its SSD staging three ways (default parts; MAMBA_SSD_SLAB_PARTS=1, the staging before 0816199;
# TF32 tensor cores with parts, MAMBA_SSD_TENSOR_CORES=1), mamba_ssm (AMP) beside it, then a
# cubecl kernel profile of the 7B-shape step.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
[ -x /tmp/b/bench_j ] || { xz -dc .devbench/bench_j.xz > /tmp/b/bench_j && chmod +x /tmp/b/bench_j; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8"
CS="train --device cuda --config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
run t130_p4 120 /tmp/b/bench_j $M --precision bf16-mixed
run t130_p1 45 env MAMBA_SSD_SLAB_PARTS=1 /tmp/b/bench_j $M --precision bf16-mixed
run t130_tc 60 env MAMBA_SSD_TENSOR_CORES=1 /tmp/b/bench_j $M --precision bf16-mixed
run t130_f32 40 /tmp/b/bench_j $M --precision f32
run t7b_p4 90 /tmp/b/bench_j $CS
run t7b_p1 45 env MAMBA_SSD_SLAB_PARTS=1 /tmp/b/bench_j $CS
run t7b_tc 60 env MAMBA_SSD_TENSOR_CORES=1 /tmp/b/bench_j $CS
cd .devbench/bench
run peer_130m_amp 200 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=20 python3 peer_mssm.py
run peer_7b 230 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 peer_mssm.py
cd $root
d=/tmp/prof7b; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
P=${CS/--warmup 1 --steps 4/--warmup 1 --steps 2}
(cd $d && timeout 75 /tmp/b/bench_j ${P/configs\//$root\/configs\/} > $d/out 2> $d/err); echo "== prof 7b rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 3 > $OUT/prof_train_7b.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_train_7b.log.xz
