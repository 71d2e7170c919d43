#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("On a GPU"), in one run (a lent machine has
# minutes): extraction / training-step ratios for the SmolLM2-135M architecture (random weights
# from its config.json; timing does not depend on the weights) in fp32 and bf16, and the
# Llama-style speed benchmark scaled up. Usage:
#   bash benchmarks/gpu.sh SMOLLM2_CONFIG_DIR OUT_DIR
# Sizes can be overridden (ITEMS, TOKENS, HIDDEN, LAYERS, BATCH_TOKENS, DEVICE) for a CPU dry run.
set -euo pipefail
cfg=$1 out=$2
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
items=${ITEMS:-16} tokens=${TOKENS:-1024} bt=${BATCH_TOKENS:-16384} dev=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" || true
for dt in fp32 bf16; do
  python3 benchmarks/real_model.py --config-only "$cfg" --device "$dev" --dtype "$dt" \
    --items "$items" --tokens "$tokens" --batch-tokens "$bt" --proj-dim 8192 --repeats 3 \
    --out "$out/real_$dt.json" > /dev/null
  echo "real_model $dt done"
done
python3 benchmarks/extract_speed.py --device "$dev" --hidden "${HIDDEN:-1024}" \
  --layers "${LAYERS:-16}" --items $((2 * items)) --tokens "$tokens" --batch-tokens "$bt" \
  --step-split both --repeats 3 --out "$out/extract_speed_$dev.json" > /dev/null
echo "extract_speed done"
