#!/usr/bin/env bash
# The GPU check, for a session that has a CUDA machine (about 6 minutes on one H200):
#   training-step slices/s (bf16 eager, bf16 compiled, fp16) at 256 x 256, 32 filters, batch 16,
#   with peak GPU memory and the host syncs torch.cuda.set_sync_debug_mode sees in the step
#   loop; a phantom written with all cores, a short default train.py run (its epoch times,
#   projected to a 100-epoch run on the 110-patient LGG set) and predict.py; finite fp16 losses;
#   two --deterministic runs that must give bit-identical weights.
# Every check runs (one failing check does not hide the next) and ends as PASS or FAIL in the
# closing table. It writes at most 4 files to $OUT (default ./device_check_out):
#   device_check.log (everything printed), device_check.json (the figures), dice.png.
# GPU work only: no ONNX, no skimage baseline, no nibabel or imagecodecs needed.
# A CPU smoke test of the script itself: DEVICE=cpu SIZE=32 FILTERS=4 STEPS=3 PATIENTS=4 bash device_check.sh
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
OUT=${OUT:-./device_check_out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
FILTERS=${FILTERS:-32}
STEPS=${STEPS:-300}
PATIENTS=${PATIENTS:-24}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
JSON="$OUT/device_check.json"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
echo '{}' >"$JSON"
declare -a RESULTS=()

# check NAME COMMAND...: run it, log its output, record PASS or FAIL (the exit status)
check() {
    local name=$1
    shift
    local start=$SECONDS
    echo "=== $name: $*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1; then
        RESULTS+=("PASS  $name ($((SECONDS - start)) s)")
    else
        RESULTS+=("FAIL  $name ($((SECONDS - start)) s, exit $?; see device_check.log)")
    fi
}

# record KEY VALUE-JSON: add one figure to device_check.json
record() {
    "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); d[sys.argv[2]] = json.loads(sys.argv[3]); json.dump(d, open(sys.argv[1], "w"), indent=1)' "$JSON" "$1" "$2"
}

machine() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
}

step_rates() {
    "$PY" - "$DEVICE" "$SIZE" "$FILTERS" "$STEPS" "$JSON" <<'PY'
"""Training-step slices/s of train.py's own train_one_epoch on a small phantom kept on the device."""
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import bench
import distributed
import train
from dataset import MRISegmentationDataset, discover_patients, load_volumes, make_synthetic_dataset
from sampling import ResidentSlices
from inference import AMP_DTYPES

device, size, filters, steps, out = torch.device(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
figures = {}
with tempfile.TemporaryDirectory() as tmp:
    make_synthetic_dataset(Path(tmp) / "p", 4, seed=0, image_size=size, slices=(20, 24))
    volumes = load_volumes(discover_patients(Path(tmp) / "p"), size, None)
    data = ResidentSlices(MRISegmentationDataset(volumes), device)
    with distributed.determinism(False, device):
        for name, amp, compiled in (("bf16 eager", "bf16", False), ("bf16 compiled", "bf16", True), ("fp16 eager", "fp16", False)):
            rate = bench.configured_training_rate(data, filters, 16, steps, device, AMP_DTYPES[amp], compiled)
            figures[f"step slices/s, {name}"] = round(rate, 1)
            print(f"{name}: {rate:.0f} slices/s")
        if device.type == "cuda":
            figures["peak GPU memory (MiB)"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
            # host syncs in the step loop: no --log-interval step inside the window
            model = bench.default_network(filters).to(device).to(memory_format=torch.channels_last)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            runtime = distributed.Runtime(device, amp_dtype=torch.bfloat16)
            criterion = bench.training_loss()

            def epoch(count, seed):  # train.py's own epoch: its loss and its augmentation, built per epoch
                augment = bench.training_augmentation(count, 16, device, seed)
                args = (optimizer, scaler, criterion, augment, runtime, count, 16, torch.Generator().manual_seed(seed))
                train.train_one_epoch(model, data, *args, seed, 10**9, progress=False)

            epoch(3, 0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                epoch(steps, 1)
                torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
            figures["host syncs in the step loop"] = f"{len(syncs)} in {steps} steps"
            for line in sorted(set(syncs))[:5]:
                print("sync:", line)
data = json.load(open(out))
data.update(figures)
json.dump(data, open(out, "w"), indent=1)
print(json.dumps(figures, indent=1))
PY
}

phantom() {
    "$PY" dataset.py synthesize "$WORK/lgg" --patients "$PATIENTS" --seed 0 --image-size 256 --min-slices 20 --max-slices 40 &&
        "$PY" dataset.py preprocess --data-dir "$WORK/lgg" --cache-dir "$WORK/cache" --image-size "$SIZE" --num-workers "$(nproc)"
}

# train_run NAME FLAGS...: a train.py run on the phantom into $WORK/NAME, output in $WORK/NAME.txt too
train_run() {
    local name=$1
    shift
    "$PY" train.py --data-dir "$WORK/lgg" --cache-dir "$WORK/cache" --checkpoint-dir "$WORK/$name" \
        --log-dir "$WORK/tb" --num-workers 8 --device "$DEVICE" --image-size "$SIZE" --base-filters "$FILTERS" \
        --val-patients 4 "$@" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$WORK/$name.txt"
    return "${PIPESTATUS[0]}"
}

default_run() {
    train_run default --epochs "$EPOCHS" || return 1
    # project a 100-epoch run on the 110-patient LGG set (~3,900 kept slices) from the measured
    # epochs after the first (warm-up): training scales with slices, validation with its patients
    "$PY" - "$WORK/default.txt" "$JSON" <<'PY'
import json, re, sys
rows = [l.split() for l in open(sys.argv[1]) if re.match(r"^\d+/\d+\s", l)]
# epoch line: ... slices/s  step/val/ckpt/pics s  out  (out: the training thread's share outside the step)
parts = [[float(x) for x in r[7].split("/")] + [float(r[8].rstrip("%")) / 100] for r in rows[1:] or rows]
step, val, ckpt, pics, share = (sum(c) / len(c) for c in zip(*parts))
outside = share * step / (1 - share)
slices = int(re.search(r"\((\d+) slices\)", open(sys.argv[1]).read())[1])
# LGG: ~90 % of 3,900 slices train, 11 validation patients against 4 here; the training
# thread's time outside the step is scaled like validation (an upper bound)
epoch = step * 3900 * 0.9 / slices + outside * 11 / 4
figures = {"epoch step/val/ckpt/pics seconds, measured": f"{step:.1f}/{val:.1f}/{ckpt:.1f}/{pics:.1f} on {slices} training slices",
           "share of the epoch outside the step": f"{share:.0%}",
           "projected default 100-epoch LGG run (min)": round(100 * epoch / 60, 1)}
data = json.load(open(sys.argv[2])); data.update(figures); json.dump(data, open(sys.argv[2], "w"), indent=1)
print(json.dumps(figures, indent=1))
PY
}

predict_run() {
    "$PY" predict.py --model-path "$WORK/default/best_model.pt" --data-dir "$WORK/lgg" --output-dir "$WORK/pred" \
        --figure-path "$OUT/dice.png" --cache-dir "$WORK/cache" --no-overlays --patients all --backend torch \
        --device "$DEVICE"
}

fp16_run() {
    train_run fp16 --epochs 2 --steps-per-epoch 40 --amp fp16 --overwrite || return 1
    awk '$1 ~ /^[0-9]+\/[0-9]+$/ { n++; if ($2 != $2 + 0) bad = 1 } END { exit (bad || n != 2) }' "$WORK/fp16.txt"
}

deterministic() {
    train_run det_a --epochs 2 --steps-per-epoch 40 --deterministic || return 1
    train_run det_b --epochs 2 --steps-per-epoch 40 --deterministic || return 1
    "$PY" - "$WORK/det_a/last.pt" "$WORK/det_b/last.pt" <<'PY'
import sys
import torch
a, b = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in sys.argv[1:])
differ = [k for k in a if not torch.equal(a[k], b[k])]
print("bit-identical weights" if not differ else f"weights differ: {differ[:3]}")
sys.exit(1 if differ else 0)
PY
}

start=$SECONDS
check "machine" machine
check "training-step rates and syncs" step_rates
check "phantom ($PATIENTS patients) and preprocessing" phantom
check "train.py, $EPOCHS epochs (default flags)" default_run
check "predict.py on the GPU" predict_run
check "fp16: finite losses" fp16_run
check "--deterministic: identical weights" deterministic
record "total seconds" "$((SECONDS - start))"

{
    echo
    echo "device check, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - start)) s"
    printf '%s\n' "${RESULTS[@]}"
    "$PY" -c 'import json, sys; [print(f"  {k}: {v}") for k, v in json.load(open(sys.argv[1])).items()]' "$JSON"
} | tee -a "$LOG"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
