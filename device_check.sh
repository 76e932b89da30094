#!/usr/bin/env bash
# The GPU check of the speed issue, for a session that has a CUDA machine:
#   bench.py on CUDA (with and without torch.compile), then a 3-epoch train.py run and
#   predict.py on an LGG-sized phantom (110 patients, 20-88 slices). Everything it
#   prints is also written to $OUT (default ./device_check_out).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-./device_check_out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

python bench.py --device cuda --compile --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"

start=$(date +%s)
python dataset.py synthesize "$WORK/lgg" --patients 110 --seed 0 --min-slices 20 --max-slices 88
python dataset.py preprocess --data-dir "$WORK/lgg" --cache-dir "$WORK/cache" --num-workers 16 2>&1 | tail -1 | tee "$OUT/preprocess.txt"
echo "phantom + preprocessing: $(( $(date +%s) - start )) s" | tee -a "$OUT/preprocess.txt"

start=$(date +%s)
python train.py --data-dir "$WORK/lgg" --cache-dir "$WORK/cache" --checkpoint-dir "$WORK/ckpt" \
    --log-dir "$WORK/tb" --epochs 3 --num-workers 8 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$OUT/train.txt"
echo "train.py wall time, 3 epochs incl. start-up and validation: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.txt"

python predict.py --model-path "$WORK/ckpt/best_model.pt" --data-dir "$WORK/lgg" --output-dir "$WORK/pred" \
    --figure-path "$OUT/dice.png" --cache-dir "$WORK/cache" --no-overlays 2>&1 | tail -3 | tee "$OUT/predict.txt"
rm -rf "$WORK"
