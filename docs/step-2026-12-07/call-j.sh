#!/bin/bash
# Call J (issues 14 and 16 in one call, what the device time left allows): `bench_k` = c1be27e's
# code (SSD slabs staged in up to four parts, the SSD backward's reductions folded in, the fused
# decode step loading a pass's rows before storing, the unrolled projection loop) plus the
# tensor cores' output stage in the left slab (so the TF32 path stages four parts too). The
# training step at both of issue 14's shapes (default; MAMBA_SSD_SLAB_PARTS=1; TF32 tensor
# cores) with mamba_ssm (AMP) beside it, then issue 16's decoding points with transformers.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
[ -x /tmp/b/bench_k ] || { xz -dc .devbench/bench_k.xz > /tmp/b/bench_k && chmod +x /tmp/b/bench_k; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
echo "nsys: $(which nsys) ncu: $(which ncu)" >> $LOG
B=/tmp/b/bench_k
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
CS="train --device cuda --config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
C7=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run t130 90 $B $M
run t130_tc 40 env MAMBA_SSD_TENSOR_CORES=1 $B $M
run t7b 45 $B $CS
run t7b_tc 40 env MAMBA_SSD_TENSOR_CORES=1 $B $CS
run g_cs_b1 40 $B $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
run g_cs_b1_rolled 25 env MAMBA_GEMV_UNROLL=off $B $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
run hf_cs_b1 60 $H --config $C7 --batch 1 --dtype bfloat16
run g_130m_b1 40 $B $A --config $M2 --batch 1 --warmup 1 --iters 3
run g_130m_b32 45 $B $A --config $M2 --batch 32 --warmup 1 --iters 3
run peer_130m_amp 110 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=12 python3 .devbench/bench/peer_mssm.py
run t130_p1 25 env MAMBA_SSD_SLAB_PARTS=1 $B $M
run t7b_p1 30 env MAMBA_SSD_SLAB_PARTS=1 $B $CS
run peer_7b 150 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 .devbench/bench/peer_mssm.py
run g_cs_b32 25 $B $A --config $C7 --batch 32 --precision bf16 --warmup 1 --iters 1
# A cubecl kernel profile of the 7B shape's batch-1 decoding (64 new tokens; every launch timed
# alone: at this shape a projection runs for tens of microseconds, so its time reads true).
d=/tmp/profdec; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 40 $B generate --device cuda --prompt-len 512 --new-tokens 64 --json --config $root/$C7 --batch 1 --precision bf16 --warmup 0 --iters 1 > $d/out 2> $d/err); echo "== prof dec rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 64 > $OUT/prof_gen_7b_b1.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_gen_7b_b1.log.xz
