#!/usr/bin/env bash
# LoRA training throughput and peak GPU memory on CUDA, with and without gradient checkpointing:
# the mamba2-130m shape (random init), english_quotes packed into 1,024-token rows, batch 8.
#
#   scripts/bench_train_gpu.sh <dir>
# <dir> holds `train` (a release build with the cuda feature), `config.json` (the model shape),
# `tokenizer.json` and `quotes.jsonl`. Prints one JSON line per setting. Tokens/s is measured over
# steps 5..N (after kernel compilation and autotuning); memory is nvidia-smi's peak `memory.used`
# for the device (the CubeCL memory pools included).
set -u
D=$1
STEPS=${STEPS:-14}
for gc in false true; do
  out=/tmp/bench_gc_$gc
  rm -rf "$out"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/mem_$gc.txt &
  mon=$!
  "$D/train" --config configs/lora.toml --device cuda \
    --set model.source= --set "model.init=\"$D/config.json\"" \
    --set "tokenizer.source=\"$D/tokenizer.json\"" \
    --set "data.source=\"$D/quotes.jsonl\"" --set data.file= --set data.seq_len=1024 --set data.layout=pack \
    --set train.batch_size=8 --set train.steps=$STEPS --set train.eval_every=0 --set train.eval_batches=1 \
    --set train.checkpoint_every=0 --set train.log_every=1 --set train.gradient_checkpointing=$gc \
    --set 'lora.target_modules=["in_proj","out_proj","embeddings"]' \
    --set output.export_merged=false --set "output.dir=\"$out\"" > /tmp/train_$gc.log 2>&1
  rc=$?
  kill $mon 2>/dev/null
  peak=$(sort -n /tmp/mem_$gc.txt | tail -1)
  python3 - "$out/metrics.jsonl" "$gc" "$peak" "$rc" <<'PY'
import json, sys
path, gc, peak, rc = sys.argv[1:]
rows = []
try:
    rows = [json.loads(l) for l in open(path) if '"loss"' in l]
except FileNotFoundError:
    pass
t = {r["step"]: r["elapsed_s"] for r in rows}
steps = sorted(t)
res = {"model": "mamba2-130m shape (random init)", "lora": "r 8 on in_proj, out_proj, embeddings",
       "batch": 8, "seq_len": 1024, "gradient_checkpointing": gc == "true", "exit_code": int(rc),
       "peak_gpu_mem_mib": int(peak) if peak else None}
if len(steps) >= 6:
    a, b = steps[4], steps[-1]
    res["steady_ms_per_step"] = 1000 * (t[b] - t[a]) / (b - a)
    res["tokens_per_s"] = 8 * 1024 * (b - a) / (t[b] - t[a])
    res["first_loss"], res["last_loss"] = rows[0]["loss"], rows[-1]["loss"]
print(json.dumps(res))
PY
  tail -3 /tmp/train_$gc.log
done
