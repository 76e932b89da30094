#!/usr/bin/env bash
# The GPU check, for a session that has a CUDA machine:
#   bench.py on CUDA (with and without torch.compile); an LGG-sized phantom (110 patients,
#   20-88 slices); a 3-epoch train.py run (--amp auto) and predict.py; short --amp bf16 and
#   --amp fp16 runs (finite losses, slices/s); two --deterministic runs that must give equal
#   losses and bit-identical weights. Everything it prints is also written to $OUT
#   (default ./device_check_out). Exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-./device_check_out}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

python bench.py speed --device cuda --compile --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"

start=$(date +%s)
python dataset.py synthesize "$WORK/lgg" --patients 110 --seed 0 --min-slices 20 --max-slices 88
python dataset.py preprocess --data-dir "$WORK/lgg" --cache-dir "$WORK/cache" --num-workers 16 2>&1 | tail -1 | tee "$OUT/preprocess.txt"
echo "phantom + preprocessing: $(( $(date +%s) - start )) s" | tee -a "$OUT/preprocess.txt"

# train NAME FLAGS...: a train.py run on the phantom into $WORK/NAME; its epoch rows go to $OUT/NAME.txt
train() {
    local name=$1
    shift
    python train.py --data-dir "$WORK/lgg" --cache-dir "$WORK/cache" --checkpoint-dir "$WORK/$name" \
        --log-dir "$WORK/tb" --num-workers 8 "$@" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$OUT/$name.txt"
}
# epoch rows (epoch, train loss, ..., slices/s, time) of a run's output
rows() { awk '$1 ~ /^[0-9]+\/[0-9]+$/' "$OUT/$1.txt"; }

start=$(date +%s)
train train --epochs 3
echo "train.py wall time, 3 epochs incl. start-up and validation: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.txt"
python predict.py --model-path "$WORK/train/best_model.pt" --data-dir "$WORK/lgg" --output-dir "$WORK/pred" \
    --figure-path "$OUT/dice.png" --cache-dir "$WORK/cache" --no-overlays 2>&1 | tail -3 | tee "$OUT/predict.txt"

short=(--epochs 2 --steps-per-epoch 40)
for amp in bf16 fp16; do
    train "amp_$amp" "${short[@]}" --amp "$amp"
    rows "amp_$amp" | awk -v amp="$amp" '{ if ($2 != $2 + 0 || $2 == "nan") bad = 1; print "amp " amp ": epoch " $1 ", loss " $2 ", " $7 " slices/s" }
        END { if (bad || NR != 2) { print "amp " amp ": FAILED (non-finite loss or missing epoch)"; exit 1 } }' \
        | tee -a "$OUT/summary.txt"
done

train det_a "${short[@]}" --deterministic
train det_b "${short[@]}" --deterministic
if [ "$(rows det_a | awk '{print $2, $3, $4}')" = "$(rows det_b | awk '{print $2, $3, $4}')" ]; then
    echo "--deterministic: equal losses and Dice in two runs" | tee -a "$OUT/summary.txt"
else
    echo "--deterministic: FAILED, the two runs differ" | tee -a "$OUT/summary.txt"
    exit 1
fi
python - "$WORK/det_a/last.pt" "$WORK/det_b/last.pt" <<'PY' | tee -a "$OUT/summary.txt"
import sys

import torch

a, b = (torch.load(path, map_location="cpu", weights_only=True)["model"] for path in sys.argv[1:])
differ = [key for key in a if not torch.equal(a[key], b[key])]
print("--deterministic: bit-identical weights" if not differ else f"--deterministic: FAILED, {differ[:3]} differ")
sys.exit(1 if differ else 0)
PY
