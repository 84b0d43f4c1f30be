#!/bin/bash
# Call E2 (after E1, same binary): decoding where E1 left questions (the 7B shape at batch 4 on
# both paths; 130m batch 32 with the LM head kept off cuBLAS; a profile of the three-launch path
# at 32 rows, which E1 measured slower), then issue 14's 130m comparison in one call, which the
# last sessions did not get: our LoRA step (bf16-mixed and f32) and mamba_ssm's (AMP and f32) at
# 8 x 1,024, no checkpointing.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
A="generate --device cuda --prompt-len 512 --new-tokens 256 --json"
M2=configs/models/mamba2-130m-hf.json
CS=configs/models/mamba-codestral-7b-shape.json
M="--config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 8"
run g_cs_b4_on 60 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $CS --batch 4 --precision bf16 --warmup 1 --iters 2
run g_cs_b4_off 60 env MAMBA_FUSED_DECODE=off /tmp/b/bench $A --config $CS --batch 4 --precision bf16 --warmup 1 --iters 2
run m_bf16 90 /tmp/b/bench train --device cuda $M --precision bf16-mixed --json
run m_f32 60 /tmp/b/bench train --device cuda $M --precision f32 --json
cd .devbench/bench
run peer_130m 200 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=0,1 ITERS=8 python3 peer_mssm.py
cd ../..
run g_130m_b32_off_nocublas 80 env MAMBA_FUSED_DECODE=off MAMBA_CUBLAS_MIN_FLOP=1e12 /tmp/b/bench $A --config $M2 --batch 32 --warmup 1 --iters 3
root=$PWD; d=/tmp/p_dec; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 60 env MAMBA_FUSED_DECODE=on /tmp/b/bench $A --config $root/$M2 --batch 32 --new-tokens 8 --warmup 0 --iters 1 > $d/out 2> $d/err); echo "== prof dec rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 1 > $OUT/prof_decode_130m_b32_on.json 2>> $LOG
grep -o '| *[0-9.]*[mµun]*s | decode_linear[^|]*' $d/prof.log | head -60 > $OUT/prof_decode_linear_lines.txt
# Where the 130m step's launches go now (cubecl's profiler; cuBLAS products are not in it).
root=$PWD; d=/tmp/p_train; mkdir -p $d
printf '[compilation]\ncache = { file = "%s/target" }\n[autotune]\ncache = { file = "%s/target" }\n[profiling.logger]\nlevel = "basic"\nfile = "%s/prof.log"\n' $root $root $d > $d/cubecl.toml
(cd $d && timeout 90 /tmp/b/bench train --device cuda --config mamba2-130m --batch 8 --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 2 --precision bf16-mixed > $d/out 2> $d/err); echo "== prof train rc=$?" >> $LOG
python3 $root/scripts/profile_summary.py $d/prof.log 3 > $OUT/prof_train_130m.json 2>> $LOG
