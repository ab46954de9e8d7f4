#!/usr/bin/env bash
# A kit for bench/gpu.sh on a GPU node that reaches no package index: the wheels
# the worker needs beyond what such a node's image holds (numpy, Pillow,
# matplotlib, Jinja2, h5py, prometheus-client, rich, JAX with CUDA), actviz's
# own wheel, and a redis-server with the libraries it links. Made here, carried
# there, then run there from the repository's root:
#
#   bash bench/gpu_kit.sh [KIT_DIR]          # here (default .whl): versions from this venv
#   bash KIT_DIR/run.sh OUT_DIR               # there: install to /tmp/site, run bench/gpu.sh
#   JOBS=10000 SERVICE_ARGS=--task-events bash KIT_DIR/run.sh OUT_DIR   # gpu.sh's knobs
#
# PY_VERSION (default 3.12) is the node's Python; PYTHON the interpreter whose
# package versions are pinned (default .venv/bin/python). The kit is about 40 MB.
set -euo pipefail
kit="${1:-.whl}"
py="${PYTHON:-.venv/bin/python}"
target="${PY_VERSION:-3.12}"
# The worker's needs (pyproject.toml, [worker] without TensorFlow) and theirs, less
# what a GPU node's image has; click is carried for the version Celery asks, and
# absl-py, typing_extensions and urllib3 (Keras's, optree's and botocore's), which
# an image with JAX alone does not hold (TensorFlow or PyTorch would bring them).
packages=(
    keras namex optree absl-py typing_extensions
    celery kombu billiard vine amqp click click-didyoumean click-plugins click-repl
    prompt_toolkit wcwidth tzlocal tzdata redis hiredis
    boto3 botocore s3transfer jmespath urllib3
    google-re2 isal orjson
)
rm -rf "$kit"
mkdir -p "$kit/redis/bin" "$kit/redis/lib"
pins=()
for name in "${packages[@]}"; do
    pins+=("$name==$("$py" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$target" \
    --implementation cp "${platforms[@]}" -d "$kit" "${pins[@]}"
"$py" -m pip wheel -q --no-deps -w "$kit" .
# redis-server and every library it links but the C library's own.
server="$(command -v redis-server)"
cp "$server" "$kit/redis/bin/redis-server.real"
ldd "$server" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so.*|libm.so.*|ld-linux*|libpthread.so.*|libdl.so.*|librt.so.*) ;;
        *) cp -L "$lib" "$kit/redis/lib/" ;;
    esac
done
cat > "$kit/redis/bin/redis-server" <<'EOF'
#!/bin/sh
here="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.real" "$@"
EOF
cat > "$kit/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU node, from the repository's root: install the kit, run bench/gpu.sh.
set -euo pipefail
kit="$(cd "$(dirname "$0")" && pwd)"
out="${1:-bench-gpu}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$kit"/*.whl
chmod +x "$kit/redis/bin/"*
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$kit/redis/bin:$PATH"
redis-server --version
PYTHON=python3 bash bench/gpu.sh "$out"
EOF
chmod +x "$kit/redis/bin/redis-server" "$kit/run.sh"
du -sh "$kit"
