#!/usr/bin/env bash
# The GPU measurements in one script: `make bench` and `make bench-service` on a
# GPU node with the JAX backend (docs/benchmarks.md, "On a GPU").
#
#   bash bench/gpu.sh [OUT_DIR]        # PYTHON, JOBS, PER_DEVICE ("8" or "4,8"), BATCH override
#   SERVICE_ARGS=--task-events bash bench/gpu.sh   # more bench_service.py options
#
# Needs the package installed (`pip install -e '.[worker]'` plus jax[cuda]) and
# redis-server on the PATH; results and models go to a local folder (no S3 server).
set -euo pipefail
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
# Several processes share the card: none may take 75% of it at start-up.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
PER_DEVICE="${PER_DEVICE:-0}"  # 0: the worker's default (3/4 of the cores per GPU)
out="${1:-bench-gpu}"
mkdir -p "$out"
nvidia-smi -L | tee "$out/device.txt" || true
"$py" bench/bench_engine.py --repeats 30 --classic-repeats 2 --batch 8,32 | tee "$out/engine.txt"
# PER_DEVICE may list several values ("4,8"): one service run each.
for per_device in ${PER_DEVICE//,/ }; do
    "$py" bench/bench_service.py --storage file --models classic --specs :8 \
        --jobs "${JOBS:-2000}" --batch-sizes "${BATCH:-32}" --concurrency 64 \
        --per-device "$per_device" --repeats 10 --classic-repeats 1 ${SERVICE_ARGS:-} \
        | tee "$out/service-per-device-$per_device.txt"
done
