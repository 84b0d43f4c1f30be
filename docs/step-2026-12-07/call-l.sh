#!/bin/bash
# Call L (issue 14; issue 16 was resolved, its decode runs left out): `bench_p` = the chunk-scan kernel with both contractions in
# one accumulator (its row scale applied while staging `C`/`B`), which took its bf16
# tensor-core variant from 99 to 64 registers offline (two cubes a multiprocessor in call K's
# Nsight Compute, four now), against `bench_o` (call K's build). In priority order: the 7B-shape
# step on CUDA cores and on bf16 tensor cores with both builds; mamba_ssm at the 7B shape with
# the time its cold Triton compile needs (call K's 150 s were too few); the bf16 SSD against the
# reference ops on both paths (the tensor-core path's check, kernels against reference without
# the slow f64); Nsight Compute on the SSD's backward tiles; the 130m step both ways and its peer;
# then issue 16's points again (7B batch 1 with transformers, 130m batch 1 and 32).
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
for x in bench_o bench_p; do
  [ -f .devbench/$x.xz ] && { [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
BO=/tmp/b/bench_o; BP=/tmp/b/bench_p
TC="env MAMBA_SSD_TENSOR_CORES=1"
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
C7=configs/models/mamba-codestral-7b-shape.json
CS="train --device cuda --config $C7 --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
KS="kernels --device cuda --only ssd --ssd-dtype bf16 --json"
t_start=$(date +%s); CALL_S=${CALL_S:-540}
go() { local t=$2; if (( $(date +%s) - t_start + t > CALL_S )); then echo "== $1 skipped (call budget)" | tee -a $LOG >> $RES; return; fi; run "$@"; }
go t7b_p 100 $BP $CS
go t7b_p_bf 50 $TC $BP $CS
# mamba_ssm at the same shape, same call; its Triton cache comes back so a later call's peer
# runs start warm (call K's cold compile outlasted 150 s).
export TRITON_CACHE_DIR=/tmp/triton_cache
[ -f .devbench/triton_cache.tar.xz ] && { mkdir -p $TRITON_CACHE_DIR; tar -xJf .devbench/triton_cache.tar.xz -C $TRITON_CACHE_DIR; }
go peer_7b 300 env PYTHONUNBUFFERED=1 CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 .devbench/bench/peer_mssm.py
go t130_p 60 $BP $M
go t130_p_bf 40 $TC $BP $M
[ -d $TRITON_CACHE_DIR ] && tar -cJf $OUT/triton_cache.tar.xz -C $TRITON_CACHE_DIR . && ls -la $OUT >> $LOG
