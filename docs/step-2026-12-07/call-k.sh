#!/bin/bash
# Call K (issue 16, then issue 14's 130m peer): `bench_n` = the decode projection with `k`
# comptime and every read unconditional (its prologue no longer waits a round trip per staged
# element; shared memory sized to the slab), the fused Mamba2 step unrolled with unconditional
# reads and the conv bias read as stored (no cast a layer) — against `bench_m` (64ea9ab, call J's
# newest) in the same call, transformers beside them; then mamba_ssm at 130m with the time its
# cold Triton compile needs (call J's 110 s limit cut it), with our 130m training step beside it.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
root=$PWD
for x in bench_m bench_n; do
  [ -f .devbench/$x.xz ] && { [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
BN=/tmp/b/bench_n; BM=/tmp/b/bench_m
M="train --device cuda --config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
C7=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
t_start=$(date +%s); CALL_S=${CALL_S:-540}
go() { local t=$2; if (( $(date +%s) - t_start + t > CALL_S )); then echo "== $1 skipped (call budget)" | tee -a $LOG >> $RES; return; fi; run "$@"; }
go g_cs_b1_n 60 $BN $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go g_cs_b1_m 45 $BM $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go hf_cs_b1 70 $H --config $C7 --batch 1 --dtype bfloat16
go g_130m_b1_n 40 $BN $A --config $M2 --batch 1 --warmup 1 --iters 3
go g_130m_b32_n 60 $BN $A --config $M2 --batch 32 --warmup 1 --iters 3
go g_cs_b1_n_cpg1 25 env MAMBA_GEMV_CPG=1 $BN $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
go g_cs_b1_n_cpg2 25 env MAMBA_GEMV_CPG=2 $BN $A --config $C7 --batch 1 --precision bf16 --warmup 1 --iters 2
# A cubecl kernel profile of the 7B shape's batch-1 decoding with bench_n (64 new tokens; every
# launch timed alone).
if (( $(date +%s) - t_start + 45 <= CALL_S )); then
d=/tmp/profdec; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 40 $BN generate --device cuda --prompt-len 512 --new-tokens 64 --json --config $root/$C7 --batch 1 --precision bf16 --warmup 0 --iters 1 > $d/out 2> $d/err); echo "== prof dec ($BN) rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 64 > $OUT/prof_gen_7b_b1.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_gen_7b_b1.log.xz
fi
go g_130m_b1_m 25 $BM $A --config $M2 --batch 1 --warmup 1 --iters 3
go g_130m_b32_m 45 $BM $A --config $M2 --batch 32 --warmup 1 --iters 3
go t130 60 $BN $M
go peer_130m_amp 240 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=12 python3 .devbench/bench/peer_mssm.py
