#!/bin/bash
# Call A2 (the machine of call A, warm): the SSD op alone, tensor cores against CUDA cores, at the
# three bench shapes (no f64 truth: call A's timed out computing it on the host), then each under
# cubecl's kernel profiler to see which kernel moved.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
K="kernels --device cuda --only ssd --iters 10"
run k_tc 90 /tmp/b/bench $K
run k_plain 90 env MAMBA_SSD_TENSOR_CORES=0 /tmp/b/bench $K
root=$PWD
prof() { # name env...
  local name=$1; shift
  local d=/tmp/p_$name; mkdir -p $d
  printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
  (cd $d && timeout 120 env "$@" /tmp/b/bench kernels --device cuda --only ssd --iters 2 --warmup 1 > $d/out 2> $d/err); echo "== prof $name rc=$?" >> $LOG
  python3 $root/scripts/profile_summary.py $d/prof.log 1 > $OUT/prof_$name.json 2>> $LOG
}
prof tc MAMBA_SSD_TENSOR_CORES=1
prof plain MAMBA_SSD_TENSOR_CORES=0
