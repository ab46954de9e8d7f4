"""TensorFlow's native start-up lines, kept off the user's terminal.

Importing TensorFlow prints, through its C++ logging and before Python's
logging is involved, lines such as "oneDNN custom operations are on", "Could
not find cuda drivers on your machine", "This TensorFlow binary is optimized
to use available CPU instructions" and, on a machine without a GPU, "failed
call to cuInit". `TF_CPP_MIN_LOG_LEVEL` does not reach the first ones. Every
embedded `actviz submit` printed them. On a CPU whose features TensorFlow's
build does not use, the first uint8 transpose (the engine's grid tiling) prints
"oneDNN supports DT_UINT8 only on platforms with AVX-512", once a process:
`import_backend` runs one inside the capture, so it is dropped there and no
job prints it.

`quiet_native_startup()` runs a block with file descriptor 2 captured, then
writes back every captured line except those start-up notices, so a real
error or warning printed during the import still reaches stderr.

`import_backend` is also where a worker process sizes TensorFlow's thread
pools on a CPU (worker/runtime/cores.py `backend_threads`): they can change
only before its first op, which the import runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^[IW]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\]"
    r"|^E\d{4} [\d:.]+ +\d+ cuda_(?:platform|executor|driver)\.cc:\d+\] failed call to cuInit"
    r"|^E\d{4} [\d:.]+ +\d+ util\.cc:\d+\] oneDNN supports DT_\w+ only on platforms with"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)


@contextlib.contextmanager
def quiet_native_startup() -> Iterator[None]:
    """Run the block with stderr's file descriptor captured; replay what is not noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines()
                if not NOISE.search(line)
            ]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def import_backend(threads: tuple[int, int] | None = None) -> None:
    """Import Keras and its backend (and let TensorFlow look for GPUs) quietly.

    `threads`: TensorFlow's (intra-op, inter-op) pool sizes where it sees no GPU
    (worker/runtime/cores.py `backend_threads`), set before its first op, unless the
    environment sets them (TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS) or this
    process has run an op already (an embedding host's): then they stay as they are.
    """
    with quiet_native_startup():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU") and threads is not None:
                _size_pools(tf, *threads)
            # The one-time notice of oneDNN's uint8 support, here rather than in a job.
            tf.transpose(tf.zeros((1, 2), tf.uint8))


def _size_pools(tf: Any, intra: int, inter: int) -> None:
    pools = tf.config.threading
    try:
        if "TF_NUM_INTRAOP_THREADS" not in os.environ:
            pools.set_intra_op_parallelism_threads(intra)
        if "TF_NUM_INTEROP_THREADS" not in os.environ:
            pools.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TensorFlow has run an op in this process: its pools are made
        pass


def backend_pools() -> tuple[int, int] | None:
    """TensorFlow's (intra-op, inter-op) pool sizes in this process, 0 where they are its
    default (every core); None on another backend."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    pools = tf.config.threading
    return pools.get_intra_op_parallelism_threads(), pools.get_inter_op_parallelism_threads()
