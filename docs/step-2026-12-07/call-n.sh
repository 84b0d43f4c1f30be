#!/bin/bash
# Call N (issue 14): `bench_r` = the SSD backward's `dt` kernel with a cube a chunk (a thread a
# position, suffix scan in shared memory) on top of `bench_q` (call M's build), alternately at
# the 130m shape, mamba_ssm beside them with call M's Triton cache, then the 7B shape.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_q bench_r; do
  [ -f .devbench/$x.xz ] && { [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
BQ=/tmp/b/bench_q; BR=/tmp/b/bench_r
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
C7=configs/models/mamba-codestral-7b-shape.json
CS="train --device cuda --config $C7 --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
t_start=$(date +%s); CALL_S=${CALL_S:-240}
go() { local t=$2; if (( $(date +%s) - t_start + t > CALL_S )); then echo "== $1 skipped (call budget)" | tee -a $LOG >> $RES; return; fi; run "$@"; }
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p $TRITON_CACHE_DIR
[ -f .devbench/triton_cache.tar.xz ] && tar -xJf .devbench/triton_cache.tar.xz -C $TRITON_CACHE_DIR
go t130_r 30 $BR $M
go t130_q 25 $BQ $M
go t130_r2 15 $BR $M
go t130_q2 15 $BQ $M
go peer_130m 90 env PYTHONUNBUFFERED=1 CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=0,1 ITERS=12 python3 .devbench/bench/peer_mssm.py
go t7b_r 45 $BR $CS
go t7b_q 30 $BQ $CS
