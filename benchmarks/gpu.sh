#!/usr/bin/env bash
# GPU extraction, measured in one short call (see benchmarks/README.md).
#
#   benchmarks/gpu.sh             on a machine with an NVIDIA GPU: installs the [gpu] extra into a venv
#                                 (unless the current Python already sees a GPU), makes ~3,000
#                                 camera-sized JPEGs (demo photos re-encoded at 3000 px, ~6 MP), and runs
#                                 benchmarks/extract_throughput.py for efficientnet_lite0@224 and
#                                 resnet50@224 with random weights, float32 and mixed_float16: images/s,
#                                 share of the model-only limit, where the time goes (decode, resize,
#                                 host->device, compute), plus the model alone under XLA.
#   benchmarks/gpu.sh --dry-run   the same steps on the CPU at tiny scale (12 photos, 32 px, no install):
#                                 what tests/test_benchmarks.py runs, so the script is known to work
#                                 before device time is spent on it.
#
# Environment: OUT (results folder; default /tmp/featurepipe-gpu), PYTHON (default python3),
# FP_WHEELHOUSE (a folder of wheels for machines without a package index), FP_GPU_COPIES (copies of
# each demo photo, default 25 = 3,025 images).
# Results: $OUT/gpu-results.jsonl (one JSON object per backbone x precision), $OUT/student-results.json
# (`featurepipe run --finetune` on the demo photos: wall time, seconds per epoch, the fold scores) and
# $OUT/gpu-summary.txt.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/featurepipe-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu-results.jsonl"
: > "$RESULTS"

log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" >&2; }

if [[ $DRY_RUN == 1 ]]; then
    COPIES=1 LIMIT=12 UPSCALE=400 SIZE=32 XLA=""
    log "dry run: CPU, ${LIMIT} photos at ${UPSCALE} px, models at ${SIZE} px; no install"
    export CUDA_VISIBLE_DEVICES=""
else
    COPIES="${FP_GPU_COPIES:-25}" LIMIT=0 UPSCALE=3000 SIZE=224 XLA="--xla"
    if ! "$PY" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
        log "installing featurepipe[gpu] into $OUT/venv"
        "$PY" -m venv "$OUT/venv"
        PIP=("$OUT/venv/bin/python" -m pip install --quiet)
        if [[ -n "${FP_WHEELHOUSE:-}" ]]; then PIP+=(--no-index --find-links "$FP_WHEELHOUSE"); fi
        "${PIP[@]}" -e "$REPO[gpu]"
        PY="$OUT/venv/bin/python"
    fi
    "$PY" -c "import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); assert gpus, 'no GPU visible to TensorFlow'; print('GPUs:', gpus)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/gpu-summary.txt" || true
fi

log "extract_throughput: efficientnet_lite0 and resnet50 @ ${SIZE}, float32 and mixed_float16"
cd "$REPO"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/extract_throughput.py \
    --copies "$COPIES" --limit "$LIMIT" --upscale "$UPSCALE" --image-size "$SIZE" \
    --backbones efficientnet_lite0,resnet50 --weights random --precisions float32,mixed_float16 \
    --no-seed-recipe $XLA --json-out "$RESULTS" > "$OUT/extract_throughput.log"

"$PY" - "$RESULTS" >> "$OUT/gpu-summary.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'backbone':<20}{'precision':<16}{'device':<10}{'batch':>6}{'img/s':>10}{'model-only':>12}{'share':>8}"
      f"{'decode ms':>11}{'resize ms':>11}{'h2d ms/b':>10}{'gpu ms/b':>10}")
for r in rows:
    w = r["where_time_goes"]
    print(f"{r['backbone']:<20}{r['precision']:<16}{r['device'][:9]:<10}{r['batch_size']:>6}"
          f"{r['featurepipe_img_per_s_excl_build']:>10}{r['compute_limit_img_per_s']:>12}{r['share_of_model_only']:>8}"
          f"{w['decode_ms_per_image_1thread']:>11}{w['resize_ms_per_image_1thread']:>11}"
          f"{str(w['host_to_device_ms_per_batch']):>10}{str(w['compute_on_device_ms_per_batch']):>10}")
EOF
# The student (issue 22): the whole `featurepipe run --finetune` on the demo photos, timed, with the
# fine-tuning's seconds per epoch. On a GPU --finetune-folds defaults to 5: the student and the vote
# are scored on every photo, then the final student trains. The dry run: 12 photos a class at 32 px,
# one epoch, 2 folds (the same steps, small).
STUDENT_DATA="$REPO/data/demo"
STUDENT_ARGS=()
if [[ $DRY_RUN == 1 ]]; then
    STUDENT_DATA="$OUT/student-data"
    rm -rf "$STUDENT_DATA"
    for class_dir in "$REPO"/data/demo/*/; do
        name="$(basename "$class_dir")"
        mkdir -p "$STUDENT_DATA/$name"
        find "$class_dir" -maxdepth 1 -type f | sort | head -n 12 | xargs -I{} cp {} "$STUDENT_DATA/$name/"
    done
    STUDENT_ARGS=(--backbone efficientnet_lite0 --image-size 32 --folds 2 --epochs 1 --finetune-folds 2)
fi
log "student: featurepipe run --finetune on $STUDENT_DATA ${STUDENT_ARGS[*]:-}"
rm -rf "$OUT/student-run"
STARTED=$(date +%s.%N)
"$PY" -m featurepipe run "$STUDENT_DATA" --finetune "${STUDENT_ARGS[@]}" --run-dir "$OUT/student-run" \
    --cache-dir "$OUT/student-cache" --no-inspect --json > "$OUT/student-run.json" 2> "$OUT/student-run.log"
FINISHED=$(date +%s.%N)
"$PY" - "$OUT/student-run.json" "$STARTED" "$FINISHED" "$OUT/student-results.json" >> "$OUT/gpu-summary.txt" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
ft = run["finetune"]
folds = ft.get("folds") or {}
row = {"wall_s": round(float(sys.argv[3]) - float(sys.argv[2]), 1), "finetune_s": ft["seconds"],
       "seconds_per_epoch": ft["seconds_per_epoch"], "epochs_run": ft["epochs_run"], "train_images": ft["train_images"],
       "gpu": (ft.get("estimate") or {}).get("gpu"), "folds": folds.get("folds"), "folds_s": folds.get("seconds"),
       "vote_over_folds": (folds.get("frozen") or {}).get("val_accuracy"),
       "student_over_folds": (folds.get("student") or {}).get("val_accuracy"), "kept": ft["kept"],
       "backbone": (ft.get("student") or {}).get("backbone")}
json.dump(row, open(sys.argv[4], "w"))
print(f"student: run --finetune {row['wall_s']} s in all; fine-tuning {row['finetune_s']:.1f} s "
      f"({row['seconds_per_epoch']} s/epoch on {row['train_images']} images, GPU {row['gpu']}); "
      f"{row['folds']} folds {row['folds_s']} s: vote {row['vote_over_folds']}, student {row['student_over_folds']}; "
      f"kept {row['kept']}")
PY
cat "$OUT/gpu-summary.txt"
log "done: $RESULTS"
