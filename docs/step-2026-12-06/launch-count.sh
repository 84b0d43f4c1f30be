#!/bin/bash
# Launches of one LoRA training step on wgpu (launches-wgpu.txt): `launch-count.sh BIN TAG`
# with BIN a release `bench`. For each of mamba2-tiny at 2 and 6 layers (the two JSON files
# beside this script), runs `bench train --device wgpu` under cubecl's per-launch profile log with
# one timed step, two, and one again (the first run fills the kernel and autotune caches); one
# step's launches are the last two-step run's minus the last one-step run's. Logs go to
# $WORK/prof_TAG_L_S.log (WORK defaults to /tmp/launch-count).
set -u
BIN=$(realpath "$1"); TAG=$2
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/launch-count}
mkdir -p "$WORK" && cd "$WORK"
printf '[compilation]\ncache = { file = "%s/cache" }\n[autotune]\ncache = { file = "%s/cache" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' "$WORK" "$WORK" "$WORK" > cubecl.toml
for L in 2 6; do for S in 1 2 1; do
  rm -f prof.log
  timeout 900 "$BIN" train --device wgpu --config "$HERE/mamba2-tiny-$L-layers.json" --batch 2 --seq 128 \
    --lora-r 8 --checkpoint-every 0 --warmup 0 --steps $S --precision f32 > "out_${TAG}_${L}_${S}.txt" 2>&1
  cp prof.log "prof_${TAG}_${L}_${S}.log"
  # Kernel lines only (`| time | kernel | ...`); cubecl also prints a summary table at exit.
  echo "$TAG L$L steps$S: $(grep -cE '^\|\s*[0-9.]+\S*\s*\|' prof.log) launches"
done; done
