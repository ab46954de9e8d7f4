# Two commands do all the set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lock demo test lint services bench bench-service bench-census bench-scale bench-gpu test-reliability clean

LOCK   := infra/constraints.txt

# The versions in $(LOCK) are the ones the suite last ran green with; `make lock` renews them.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[worker,test]'
	touch $(STAMP)

# The newest versions pyproject.toml allows, resolved in a virtualenv of their own and
# written to $(LOCK); then `make test` says whether they may stay.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e '.[worker,test]'
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actviz demo

# Redis must answer on 127.0.0.1:6379; the S3 server is started by the tests.
services:
	bash infra/dev/ensure-services.sh

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The suite on TensorFlow (a CPU worker's backend), then the engine's tests and a worker's
# jobs on JAX (a GPU node's, bench/gpu.sh), so that its code paths run without a GPU.
JAX_TESTS := tests/engine \
	tests/service/test_round_trip.py::test_python_submit_stores_grids_manifest_and_report_in_s3 \
	tests/service/test_batching.py::test_jobs_queued_together_share_forward_passes_and_a_bad_image_fails_alone \
	tests/service/test_gradcam_jobs.py::test_grad_cam_jobs_share_passes_write_their_files_and_fail_alone

test: $(STAMP) services lint
	$(PY) -m pytest
	KERAS_BACKEND=jax $(PY) -m pytest $(JAX_TESTS)

bench: $(STAMP)
	$(PY) bench/bench_engine.py

# Starts its own redis-server and S3 server; see bench/README.md. BENCH_ARGS="--jobs 40" scales it.
bench-service: $(STAMP)
	$(PY) bench/bench_service.py $(BENCH_ARGS)

# A census of 1,000 images against the same images as plain jobs (its own redis-server).
bench-census: $(STAMP)
	$(PY) bench/bench_census.py $(BENCH_ARGS)

# Batches of 100, 1,000 and 10,000 jobs through its own redis-server and one worker
# (about 10 minutes on 2 cores); BENCH_ARGS="--sizes 100,1000" for a shorter run.
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py $(BENCH_ARGS)

# The Sentinel failover test, then kill trials: 1,000 SIGKILLs of workers at random moments under a stream of jobs, with
# default settings (about 3.5 hours on 2 cores, each replacement worker ready before the next kill);
# KILL_ARGS="--no-wait --gap 2,6" kills every 2-6 s whatever the workers are doing (about 75 minutes),
# KILL_ARGS="--kills 50" for a shorter run.
# `make test` runs a 3-kill version (tests/reliability/test_kill_trials.py).
test-reliability: $(STAMP) services
	$(PY) -m pytest -m failover tests/reliability
	cd tests/reliability && ../../$(PY) kill_trials.py $(KILL_ARGS)

# On a GPU node, JAX backend: both benchmarks with the GPU workload (bench/gpu.sh).
bench-gpu: $(STAMP)
	PYTHON=$(abspath $(PY)) bash bench/gpu.sh

clean:
	rm -rf $(VENV) actviz-results .pytest_cache .ruff_cache
