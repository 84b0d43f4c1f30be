#!/bin/bash
# Call J (issues 14 and 16 in one call, what the device time left allows): `bench_l` = 3f06913's
# code (SSD slabs staged in up to four parts, the SSD backward's reductions folded in, the fused
# decode step loading a pass's rows before storing, the unrolled projection loop) plus the
# tensor cores' output stage in the left slab (so the TF32 path stages four parts too). The
# training step at both of issue 14's shapes (default; MAMBA_SSD_SLAB_PARTS=1; TF32 tensor
# cores) with mamba_ssm (AMP) beside it, then issue 16's decoding points with transformers.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
[ -x /tmp/b/bench_l ] || { xz -dc .devbench/bench_l.xz > /tmp/b/bench_l && chmod +x /tmp/b/bench_l; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
echo "nsys: $(which nsys) ncu: $(which ncu)" >> $LOG
B=/tmp/b/bench_l
# bench_m: + the projection kernel launched unchecked with its staging loop unrolled.
[ -f .devbench/bench_m.xz ] && { [ -x /tmp/b/bench_m ] || { xz -dc .devbench/bench_m.xz > /tmp/b/bench_m && chmod +x /tmp/b/bench_m; }; }
BM=/tmp/b/bench_m
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
CS="train --device cuda --config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
C7=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
# The call may hold less time than all of this takes (a short lease): `go` skips a run whose
# limit would end past CALL_S seconds from the start (default 540), so the call ends with its
# files instead of being cut off mid-run. Runs are in priority order.
t_start=$(date +%s); CALL_S=${CALL_S:-540}
go() { local t=$2; if (( $(date +%s) - t_start + t > CALL_S )); then echo "== $1 skipped (call budget)" | tee -a $LOG >> $RES; return; fi; run "$@"; }
go t130 90 $B $M
go t130_tc 40 env MAMBA_SSD_TENSOR_CORES=1 $B $M
go peer_130m_amp 110 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=12 python3 .devbench/bench/peer_mssm.py
go t7b 45 $B $CS
go t7b_tc 40 env MAMBA_SSD_TENSOR_CORES=1 $B $CS
go g_cs_b1 40 $B $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
[ -x $BM ] && go g_cs_b1_m 60 $BM $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go hf_cs_b1 60 $H --config $C7 --batch 1 --dtype bfloat16
go g_130m_b1 40 $B $A --config $M2 --batch 1 --warmup 1 --iters 3
[ -x $BM ] && go g_130m_b1_m 40 $BM $A --config $M2 --batch 1 --warmup 1 --iters 3
go g_130m_b32 45 $B $A --config $M2 --batch 32 --warmup 1 --iters 3
go peer_7b 150 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 .devbench/bench/peer_mssm.py
# A cubecl kernel profile of the 7B shape's batch-1 decoding with the newest build (64 new
# tokens; every launch timed alone: at this shape a projection runs for tens of microseconds,
# so its time reads true).
P=$B; [ -x $BM ] && P=$BM
if (( $(date +%s) - t_start + 45 <= CALL_S )); then
d=/tmp/profdec; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 40 $P generate --device cuda --prompt-len 512 --new-tokens 64 --json --config $root/$C7 --batch 1 --precision bf16 --warmup 0 --iters 1 > $d/out 2> $d/err); echo "== prof dec ($P) rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 64 > $OUT/prof_gen_7b_b1.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_gen_7b_b1.log.xz
fi
go g_cs_b1_rolled 25 env MAMBA_GEMV_UNROLL=off $B $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go t130_p1 25 env MAMBA_SSD_SLAB_PARTS=1 $B $M
go t7b_p1 30 env MAMBA_SSD_SLAB_PARTS=1 $B $CS
go g_cs_b32 25 $B $A --config $C7 --batch 32 --precision bf16 --warmup 1 --iters 1
