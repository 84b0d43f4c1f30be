#!/bin/bash
# Call G3: what the last device minutes allow: the build of 0bea8a3 (`bench`) beside the one
# before this session's changes (`bench_old`, 0c7ad04) at the 130m LoRA shape, one machine.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
[ -x /tmp/b/bench_old ] || { xz -dc .devbench/bench_old.xz > /tmp/b/bench_old && chmod +x /tmp/b/bench_old; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $LOG
M="--config mamba2-130m --seq 1024 --lora-r 8 --checkpoint-every 0 --warmup 1 --steps 5 --json"
run new_130m_bf16 60 /tmp/b/bench train --device cuda $M --batch 8 --precision bf16-mixed
run old_130m_bf16 40 /tmp/b/bench_old train --device cuda $M --batch 8 --precision bf16-mixed
run new_130m_bf16_again 30 /tmp/b/bench train --device cuda $M --batch 8 --precision bf16-mixed
