#!/bin/bash
BIN=$1; TAG=$2
cd /tmp/pw
for L in 2 6; do for S in 1 2 1; do
  rm -f prof.log
  timeout 900 $BIN train --device wgpu --config /tmp/pw/tiny$L.json --batch 2 --seq 128 --lora-r 8 --checkpoint-every 0 --warmup 0 --steps $S --precision f32 > /tmp/pw/out_${TAG}_${L}_${S}.txt 2>&1
  cp prof.log /tmp/pw/prof_${TAG}_${L}_${S}.log
  echo "$TAG L$L steps$S: $(grep -c '^|' prof.log) launches"
done; done
