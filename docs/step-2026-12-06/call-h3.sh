#!/bin/bash
# Call H3: the cat A/B again with the builds alternating (H2's runs got faster one after another
# on a cold machine), and the kernel profile of 130m decoding at batch 32 that failed in H2 (the
# model config's path was relative to the profile's working directory).
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
for x in bench_new bench_cat; do
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json --batch 8 --precision bf16-mixed"
run warm_up 120 /tmp/b/bench_cat train --device cuda $M
for i in 1 2 3; do
  run new_$i 60 /tmp/b/bench_new train --device cuda $M
  run cat_$i 60 /tmp/b/bench_cat train --device cuda $M
done
root=$PWD
d=/tmp/p_gen; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 150 /tmp/b/bench_cat generate --device cuda --config $root/configs/models/mamba2-130m-hf.json --batch 32 --prompt-len 512 --new-tokens 256 --warmup 0 --iters 1 --json > $d/out 2> $d/err); echo "== prof gen rc=$?" >> $LOG
tail -c 1500 $d/err >> $LOG; cat $d/out >> $RES
python3 $root/scripts/profile_summary.py $d/prof.log 513 > $OUT/prof_gen_130m_b32.json 2>> $LOG
xz -c $d/prof.log > $OUT/prof_gen_130m_b32.log.xz
