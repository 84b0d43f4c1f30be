#!/bin/bash
# Call B (the same machine, warm): the peer, mamba_ssm's Mamba2 module, at both bench shapes.
cd "$(dirname "$0")/../.."
source docs/cublas-2026-12-06/common.sh
cd .devbench/bench
run peer_130m 260 env CFG=130m SHAPES=8x1024 LORA=1 GC=0 AMP=0,1 ITERS=5 python3 peer_mssm.py
run peer_cs 300 env CFG=codestral SHAPES=4x2048 LORA=1 GC=1 AMP=1 ITERS=3 python3 peer_mssm.py
