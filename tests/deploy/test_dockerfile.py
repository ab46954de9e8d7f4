"""The worker image: hadolint-clean, GPU by default, CPU by build arg, non-root, health-checked."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "worker" / "Dockerfile"
# Where Keras, matplotlib, numba (worker/engine/host_kernels.py) and the model cache write.
CACHE_VARIABLES = ("KERAS_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR", "ACTVIZ_MODEL_CACHE_DIR")


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else (shutil.which("hadolint") or "hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_reports_nothing():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_build_is_multi_stage_and_final_stage_runs_as_non_root():
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) >= 2
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    copies = [args for word, args in final if word == "COPY"]
    assert all(c.startswith("--from=") for c in copies), "final stage copies build context"


def test_tensorflow_is_pinned_gpu_by_default_and_inside_the_supported_range():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=gpu$", text, re.M)
    version = re.search(r"^ARG TF_VERSION=(\S+)$", text, re.M).group(1)
    installs = dict(
        re.findall(r'^\s*(gpu|cpu)\) pip install -c /opt/constraints.txt "([^"]+)"', text, re.M)
    )
    assert installs == {
        "gpu": "tensorflow[and-cuda]==${TF_VERSION}",
        "cpu": "tensorflow==${TF_VERSION}",
    }
    # The same distribution name the package requires, or pip installs TensorFlow twice.
    for spec in installs.values():
        assert Requirement(spec.replace("${TF_VERSION}", version)).name == "tensorflow"
    pin = re.search(r'"(tensorflow[<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text())
    tf = Requirement(pin.group(1))
    assert tf.specifier.contains(version), f"{version} outside pyproject's {tf.specifier}"
    # The version the suite ran with (make lock), or the image's pip refuses the pair.
    locked = re.search(r"^tensorflow==(\S+)$", (ROOT / "infra/constraints.txt").read_text(), re.M)
    assert locked and locked.group(1) == version, (locked, version)


def test_healthcheck_probes_healthz_with_python_and_command_is_actviz_worker():
    ins = dict(instructions())
    assert "/healthz" in ins["HEALTHCHECK"] and "urllib.request" in ins["HEALTHCHECK"]
    assert "curl" not in ins["HEALTHCHECK"]
    assert ins["ENTRYPOINT"] == '["actviz"]'
    assert ins["CMD"] == '["worker"]'
    assert ins["STOPSIGNAL"] == "SIGTERM"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build():
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    # Deny-all first, then only what the image installs is let back in.
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "infra/constraints.txt", "README.md", "producer", "worker"}
    copied = {
        source.rstrip("/").removeprefix("./")
        for word, args in instructions()
        if word == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    assert copied and copied <= allowed


def test_every_cache_the_worker_writes_is_made_under_the_one_cache_folder():
    """Keras, matplotlib, numba's compiled loops and the models: a read-only root
    filesystem then needs one writable mount, /home/actviz/.cache."""
    ins = instructions()
    # The stage the runtime images build on (the last FROM of a Python image).
    start = max(
        i for i, (w, a) in enumerate(ins) if w == "FROM" and a.startswith("${PYTHON_IMAGE}")
    )
    final = ins[start:]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for word, args in final if word == "ENV")))
    caches = {name: env.get(name) for name in CACHE_VARIABLES}
    assert all(path and path.startswith("/home/actviz/.cache/") for path in caches.values()), caches
    made = " ".join(args for word, args in final if word == "RUN" and args.startswith("mkdir"))
    assert all(path in made.split() for path in caches.values()), (caches, made)
