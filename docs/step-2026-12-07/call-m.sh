#!/bin/bash
# Call M (issue 14): `bench_q` = the split's pieces as views wherever they start aligned (burn's
# `narrow` copied `z` and `xBC` every forward: `SliceKernel`, 120 ms of call K's 7B profile) and
# the norms' vector kernels, against `bench_p` (call L's build), alternately at both shapes;
# mamba_ssm beside them in the same call (its 7B Triton cache from call L, so it starts warm;
# the 130m cache is brought back for later calls); the new build's 130m step profiled.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
for x in bench_p bench_q; do
  [ -f .devbench/$x.xz ] && { [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
BP=/tmp/b/bench_p; BQ=/tmp/b/bench_q
TC="env MAMBA_SSD_TENSOR_CORES=1"
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8"
C7=configs/models/mamba-codestral-7b-shape.json
CS="train --device cuda --config $C7 --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
t_start=$(date +%s); CALL_S=${CALL_S:-540}
go() { local t=$2; if (( $(date +%s) - t_start + t > CALL_S )); then echo "== $1 skipped (call budget)" | tee -a $LOG >> $RES; return; fi; run "$@"; }
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p $TRITON_CACHE_DIR
[ -f .devbench/triton_cache.tar.xz ] && tar -xJf .devbench/triton_cache.tar.xz -C $TRITON_CACHE_DIR
go t7b_q 80 $BQ $CS
go t7b_p 50 $BP $CS
go t7b_q_tc 50 $TC $BQ $CS
go t7b_q2 40 $BQ $CS
go peer_7b 150 env PYTHONUNBUFFERED=1 CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 .devbench/bench/peer_mssm.py
go t130_q 40 $BQ $M --precision bf16-mixed
go t130_p 30 $BP $M --precision bf16-mixed
go t130_q2 20 $BQ $M --precision bf16-mixed
go t130_p2 20 $BP $M --precision bf16-mixed
go t130_q_nv 20 env MAMBA_NORM_VECTORS=off $BQ $M --precision bf16-mixed
go t130_q_f32 40 $BQ $M --precision f32
prof() { # name limit args...: a cubecl-profiled run, summarised over $STEPS steps
  local name=$1 t=$2; shift 2
  if (( $(date +%s) - t_start + t > CALL_S )); then echo "== prof $name skipped (call budget)" >> $LOG; return; fi
  local d=/tmp/prof_$name; mkdir -p $d
  printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
  (cd $d && timeout $t "$@" > $d/out 2> $d/err); echo "== prof $name rc=$?" >> $LOG
  tail -c 800 $d/err >> $LOG
  python3 $root/scripts/profile_summary.py $d/prof.log $STEPS > $OUT/prof_$name.json 2>> $LOG
}
# The new build's 130m step under cubecl's profiler (each launch timed alone; cuBLAS not in it).
STEPS=3 prof train_130m_q 40 $BQ train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 2 --json --batch 8 --precision bf16-mixed
go peer_130m 250 env PYTHONUNBUFFERED=1 CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=0,1 ITERS=12 python3 .devbench/bench/peer_mssm.py
tar -cJf $OUT/triton_cache.tar.xz -C $TRITON_CACHE_DIR . ; ls -la $OUT >> $LOG
