#!/bin/bash
# Call I3 (issue 14): SSD tile kernels staging `parts` 16-deep parts of K between two syncs
# (`bench_parts`; MAMBA_SSD_SLAB_PARTS=1 is the old kernels' staging, one part a slab) at the
# kernel benchmark's SSD shapes and in the 130m LoRA step; ncu's view of the SSD kernels.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_parts; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
K="kernels --device cuda --shapes bench --only ssd --json"
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
run t_p4 120 /tmp/b/bench_parts $M
run t_p1 60 env MAMBA_SSD_SLAB_PARTS=1 /tmp/b/bench_parts $M
run t_p4_again 45 /tmp/b/bench_parts $M
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis"
run ncu_p4 90 $NCU --clock-control none -k regex:'[Ss]sd' --launch-skip 12 --launch-count 12 $S /tmp/b/bench_parts $K
run ncu_p1 90 env MAMBA_SSD_SLAB_PARTS=1 $NCU --clock-control none -k regex:'[Ss]sd' --launch-skip 12 --launch-count 12 $S /tmp/b/bench_parts $K
