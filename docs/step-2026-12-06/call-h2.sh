#!/bin/bash
# Call H2: `bench_cat` (H1's code plus the split's backward `cat` as one kernel) against
# `bench_new` (H1's build) on one machine; a cubecl kernel profile of the 130m step (the issue's
# table); a kernel profile of 130m decoding at batch 32 (issue 16's next step); mamba_ssm (130m) beside.
# The 7B shape is not rerun: the cat does not touch its time much, and H1 has it beside the peer.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_new bench_cat; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json"
run cat_130m_bf16 120 /tmp/b/bench_cat train --device cuda $M --batch 8 --precision bf16-mixed
run new_130m_bf16 90 /tmp/b/bench_new train --device cuda $M --batch 8 --precision bf16-mixed
run cat_130m_bf16_again 60 /tmp/b/bench_cat train --device cuda $M --batch 8 --precision bf16-mixed
run cat_130m_f32 60 /tmp/b/bench_cat train --device cuda $M --batch 8 --precision f32
root=$PWD
prof() { # name timeout args...: a cubecl-profiled run of bench_cat, summarised over $STEPS
  local name=$1 t=$2; shift 2; local d=/tmp/p_$name; mkdir -p $d
  printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
  (cd $d && timeout $t /tmp/b/bench_cat "$@" > $d/out 2> $d/err); echo "== prof $name rc=$?" >> $LOG
  tail -c 600 $d/err >> $LOG; cat $d/out >> $RES
  python3 $root/scripts/profile_summary.py $d/prof.log $STEPS > $OUT/prof_$name.json 2>> $LOG
  xz -c $d/prof.log > $OUT/prof_$name.log.xz
}
STEPS=4 prof train_130m 90 train --device cuda --config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 2 --precision bf16-mixed --json
STEPS=513 prof gen_130m_b32 150 generate --device cuda --config $root/configs/models/mamba2-130m-hf.json --batch 32 --prompt-len 512 --new-tokens 256 --warmup 0 --iters 1 --json
cd .devbench/bench
run peer_130m_amp 230 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=20 python3 peer_mssm.py
