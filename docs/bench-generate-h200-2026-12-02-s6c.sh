#!/bin/bash
# Session 6, call C: decode speed of the three-launch fused step (bench8: projections with the
# norms and the residual folded in) beside bench7 (fused mixer step + add-norm) and
# transformers' generate, same call; then a kernel profile of bench8's decode (130m, batch 1).
set -u
cd "$(dirname "$0")/.."
export LOG=$OUT/log.txt
source <(sed -n '/^run()/,/^}/p' .devbench/run.sh)
for v in 7 8; do xz -dc .devbench/bench$v.xz > /tmp/bench$v && chmod +x /tmp/bench$v; done
xz -dc .devbench/cache7.tar.xz | tar xf - && echo "caches restored (call B's)" >> $LOG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
H="python3 scripts/hf_generate_bench.py --prompt-len 512 --new-tokens 256 --iters 1"
run b8_130m_b1 150 /tmp/bench8 $A --config $M2 --batch 1 --warmup 1 --iters 3
run b8_130m_b32 60 /tmp/bench8 $A --config $M2 --batch 32 --warmup 1 --iters 3
run b7_130m_b1 90 /tmp/bench7 $A --config $M2 --batch 1 --warmup 1 --iters 3
run b7_130m_b32 60 /tmp/bench7 $A --config $M2 --batch 32 --warmup 1 --iters 3
run hf_130m_b1 60 $H --config $M2 --batch 1 --dtype float32
run hf_130m_b32 60 $H --config $M2 --batch 32 --dtype float32
run b8_cs_b1 120 /tmp/bench8 $A --config $CS --batch 1 --precision bf16 --warmup 1 --iters 2
run b8_cs_b32 90 /tmp/bench8 $A --config $CS --batch 32 --precision bf16 --warmup 1 --iters 2
run hf_cs_b1 90 $H --config $CS --batch 1 --dtype bfloat16
R=$PWD; D=/tmp/pg; mkdir -p $D
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $R $R $D > $D/cubecl.toml
(cd $D && timeout 60 /tmp/bench8 generate --device cuda --config $R/$M2 --batch 1 --prompt-len 512 --new-tokens 17 --warmup 1 --iters 1 --json > $D/out 2> $D/err); echo "== prof gen rc=$?" >> $LOG
python3 scripts/profile_summary.py $D/prof.log 1 > $OUT/prof_gen.json 2>> $LOG; head -c 2500 $OUT/prof_gen.json >> $LOG
tar cf - target/autotune target/mamba-kernels-* 2>/dev/null | xz -T16 -3 > $OUT/cache8.tar.xz; ls -la $OUT >> $LOG
