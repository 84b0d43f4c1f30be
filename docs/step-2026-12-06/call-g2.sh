#!/bin/bash
# Call G2: call G1 cut to what the last minutes of device time allow (G1 never got a machine:
# the device tool gave none for an hour). The build of 0bea8a3 (`bench`: the fused
# cross-entropy, the split op, the one-node LoRA layer, the one-launch global norm) and the one
# before this session's changes (`bench_old`, 0c7ad04) at the 130m LoRA shape, then mamba_ssm.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
[ -x /tmp/b/bench_old ] || { xz -dc .devbench/bench_old.xz > /tmp/b/bench_old && chmod +x /tmp/b/bench_old; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 2 --steps 6 --json"
run new_130m_bf16 60 /tmp/b/bench train --device cuda $M --batch 8 --precision bf16-mixed
run old_130m_bf16 45 /tmp/b/bench_old train --device cuda $M --batch 8 --precision bf16-mixed
cd .devbench/bench
run peer_130m_amp 150 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=1 ITERS=8 python3 peer_mssm.py
