#!/bin/bash
# Call J2 (issue 16): decoding with `bench_j` (c1be27e's code: the fused Mamba2 step loading a
# pass's 16 state rows before storing any and summing rows in two stages; the projection
# kernel's loop over a slab's weights unrolled, MAMBA_GEMV_UNROLL=off rolls it) at issue 16's
# points (mamba2-130m f32 and the Codestral-7B shape bf16, batch 1 and 32, prompt 512, 256 new
# tokens), transformers' `generate` beside it at batch 1 (at batch 32 it runs out of memory in
# its prefill on these cards: calls I2, E4); then a kernel profile of the 7B shape at batch 1.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
[ -x /tmp/b/bench_j ] || { xz -dc .devbench/bench_j.xz > /tmp/b/bench_j && chmod +x /tmp/b/bench_j; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run g_cs_b1 60 /tmp/b/bench_j $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
run g_130m_b32 70 /tmp/b/bench_j $A --config $M2 --batch 32 --warmup 1 --iters 3
run g_130m_b1 20 /tmp/b/bench_j $A --config $M2 --batch 1 --warmup 1 --iters 3
run hf_130m_b1 50 $H --config $M2 --batch 1 --dtype float32
run g_cs_b32 30 /tmp/b/bench_j $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 1
run g_cs_b1_rolled 30 env MAMBA_GEMV_UNROLL=off /tmp/b/bench_j $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run g_130m_b1_rolled 20 env MAMBA_GEMV_UNROLL=off /tmp/b/bench_j $A --config $M2 --batch 1 --warmup 1 --iters 3
# A cubecl kernel profile of the 7B shape's batch-1 decoding (64 new tokens; every launch timed
# alone, so small kernels read long: shares and launch counts).
root=$PWD; d=/tmp/profdec; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 40 /tmp/b/bench_j generate --device cuda --prompt-len 512 --new-tokens 64 --json --config $root/$CS --batch 1 --precision bf16 --warmup 0 --iters 1 > $d/out 2> $d/err); echo "== prof dec rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 64 > $OUT/prof_gen_7b_b1.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_gen_7b_b1.log.xz
