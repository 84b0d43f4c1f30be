#!/bin/bash
# Call K (issue 14, then 16): `bench_o` = the SSD tile kernels with a bf16 tensor-core path
# (bf16 slabs, `wmma` 16 × 16 × 16, f32 accumulation; `MAMBA_SSD_TENSOR_CORES=1` with bf16
# activations) on top of b3af98a's decoding (the branch-free projection and fused step, which
# no call has timed yet). In priority order: the 7B-shape LoRA step with the SSD on CUDA cores
# and on bf16 tensor cores; the bf16 SSD against f64 at the small shapes on both paths (the
# tensor-core path's device check); 7B batch-1 decoding, bench_o against bench_m (64ea9ab, call
# J's best) with transformers beside; mamba_ssm at the 7B shape (the same-call ratio); a kernel
# profile of the 7B step with bf16 tensor cores; Nsight Compute on the SSD tile kernels (what
# they stall on); then 130m training and decoding. (An earlier version of this script, for
# bench_n = b3af98a's build, never got a machine.)
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
for x in bench_m bench_o; do
  [ -f .devbench/$x.xz ] && { [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
BO=/tmp/b/bench_o; BM=/tmp/b/bench_m
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
go t7b 100 $BO $CS
go t7b_bf 50 $TC $BO $CS
go k_small_cc 45 $BO $KS --shapes small --truth-f64
go k_small_bf 45 $TC $BO $KS --shapes small --truth-f64
go g_cs_b1_o 50 $BO $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go g_cs_b1_m 45 $BM $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go hf_cs_b1 70 $H --config $C7 --batch 1 --dtype bfloat16
go peer_7b 150 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 .devbench/bench/peer_mssm.py
prof() { # name limit args...: a cubecl-profiled run, summarised over $STEPS steps
  local name=$1 t=$2; shift 2
  if (( $(date +%s) - t_start + t > CALL_S )); then echo "== prof $name skipped (call budget)" >> $LOG; return; fi
  local d=/tmp/prof_$name; mkdir -p $d
  printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
  (cd $d && timeout $t "$@" > $d/out 2> $d/err); echo "== prof $name rc=$?" >> $LOG
  tail -c 800 $d/err >> $LOG
  python3 $root/scripts/profile_summary.py $d/prof.log $STEPS > $OUT/prof_$name.json 2>> $LOG
  xz -c $d/prof.log > $OUT/prof_$name.log.xz
}
# The 7B step under cubecl's profiler (each launch timed alone; cuBLAS not in it), bf16 tensor
# cores, one warm-up step and one timed.
STEPS=2 prof train_7b_bf 60 $TC $BO train --device cuda --config $root/$C7 --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 1 --json --precision bf16-mixed
# Nsight Compute on the SSD tile kernels (bf16 activations, both paths), where it can read the
# counters.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
for mode in 0 1; do
  if [ -n "$NCU" ] && (( $(date +%s) - t_start + 45 <= CALL_S )); then
    MAMBA_SSD_TENSOR_CORES=$mode timeout 45 $NCU --kernel-name regex:'ssd_(state_tile|scan_tile|bwd_dbc_tile|bwd_w_tile)' \
      --launch-count 5 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --csv --page details $BO $KS --shapes bench --warmup 0 --iters 1 > $OUT/ncu_ssd_tc$mode.csv 2> /tmp/o/ncu$mode.err
    echo "== ncu tc=$mode rc=$?" >> $LOG; tail -c 1200 /tmp/o/ncu$mode.err >> $LOG
  fi
done
go t130 60 $BO $M
go t130_bf 40 $TC $BO $M
go g_130m_b1_o 40 $BO $A --config $M2 --batch 1 --warmup 1 --iters 3
go g_130m_b32_o 60 $BO $A --config $M2 --batch 32 --warmup 1 --iters 3
go g_130m_b32_m 45 $BM $A --config $M2 --batch 32 --warmup 1 --iters 3
go k_bench_cc 60 $BO $KS --shapes bench
go k_bench_bf 60 $TC $BO $KS --shapes bench
STEPS=64 prof gen_7b_b1 40 $BO generate --device cuda --prompt-len 512 --new-tokens 64 --json --config $root/$C7 --batch 1 --precision bf16 --warmup 0 --iters 1
go g_cs_b1_o_cpg2 25 env MAMBA_GEMV_CPG=2 $BO $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go peer_130m_amp 240 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=12 python3 .devbench/bench/peer_mssm.py
