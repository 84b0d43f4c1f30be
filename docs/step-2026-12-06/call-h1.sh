#!/bin/bash
# Call H1: `bench_new` (one read a step at its end, the clipping factor on the device; the SSD
# backward reading the forward's kept intermediates; the host's phase timings; built with
# symbols for `--host-profile`: cargo build --release --features host-profile --bin bench
# --config 'profile.release.package.mamba-burn.strip=false') against `bench` (the build of G1,
# code of a7e4780) on one machine, mamba_ssm beside them.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
[ -x /tmp/b/bench_new ] || { xz -dc .devbench/bench_new.xz > /tmp/b/bench_new && chmod +x /tmp/b/bench_new; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 10 --json"
CS="--config configs/models/mamba-codestral-7b-shape.json --batch 4 --seq 2048 --lora-r 8 --checkpoint-every 1 --warmup 1 --steps 4 --precision bf16-mixed --json"
run new_130m_bf16 120 /tmp/b/bench_new train --device cuda $M --batch 8 --precision bf16-mixed
run prev_130m_bf16 90 /tmp/b/bench train --device cuda $M --batch 8 --precision bf16-mixed
run new_130m_f32 60 /tmp/b/bench_new train --device cuda $M --batch 8 --precision f32
run new_130m_bf16_b4 60 /tmp/b/bench_new train --device cuda $M --batch 4 --precision bf16-mixed
run new_130m_bf16_host 60 /tmp/b/bench_new train --device cuda $M --batch 8 --precision bf16-mixed --host-profile $OUT/host_130m_bf16.txt
run new_7b 150 /tmp/b/bench_new train --device cuda $CS
run prev_7b 90 /tmp/b/bench train --device cuda $CS
xz -f $OUT/host_130m_bf16.txt
cd .devbench/bench
run peer_130m_amp 230 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=20 python3 peer_mssm.py
run peer_7b 260 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=4 python3 peer_mssm.py
