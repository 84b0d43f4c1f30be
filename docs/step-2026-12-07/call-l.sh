#!/bin/bash
# Call L (issue 14 first, then 16): `bench_p` = the chunk-scan kernel with both contractions in
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
go t7b_o_bf 60 $TC $BO $CS
go peer_7b 240 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 .devbench/bench/peer_mssm.py
go k_small_p_cc 60 $BP $KS --shapes small
go k_small_p_bf 60 $TC $BP $KS --shapes small
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
for mode in 0 1; do
  if [ -n "$NCU" ] && (( $(date +%s) - t_start + 60 <= CALL_S )); then
    MAMBA_SSD_TENSOR_CORES=$mode timeout 60 $NCU --kernel-name regex:'ssd_(scan_tile|bwd_dbc_tile|bwd_w_tile)' \
      --launch-count 6 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis \
      --csv --page details $BP $KS --shapes bench --warmup 0 --iters 1 > $OUT/ncu_ssd_p_tc$mode.csv 2> /tmp/o/ncu$mode.err
    echo "== ncu tc=$mode rc=$?" >> $LOG; tail -c 1200 /tmp/o/ncu$mode.err >> $LOG
  fi
done
go t130_p 60 $BP $M
go t130_p_bf 40 $TC $BP $M
go peer_130m_amp 240 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=12 python3 .devbench/bench/peer_mssm.py
go g_cs_b1_p 50 $BP $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go hf_cs_b1 70 $H --config $C7 --batch 1 --dtype bfloat16
go g_130m_b32_p 60 $BP $A --config $M2 --batch 32 --warmup 1 --iters 3
go g_130m_b1_p 40 $BP $A --config $M2 --batch 1 --warmup 1 --iters 3
