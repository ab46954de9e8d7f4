"""Engine benchmark: the classic notebook recipe vs `analyze()`, in one run.

On the classic cats-vs-dogs CNN (4x Conv2D + MaxPooling2D on 150x150x3, Dense
head, random weights), for the first 8 layers (spec ":8"), at batch 1 and at
--batch (default 8) images per pass:

  a  forward   the compiled forward pass alone (each output summed to a
               scalar on the device, so it is computed, and nothing else copied)
  e  eager     the extractor called eagerly, every layer copied to the host as
               float32 (what the engine ran before its passes were compiled)
  d  device    the compiled pass analyze() runs: forward + statistics,
               normalization, palette indices and grid tiling on the device,
               and the copy of uint8 grids + statistics to the host
  c  engine    analyze(): decode + preprocess, the device pass, every grid
               PNG (encoded over the cores), statistics JSON, manifest bytes
  g  gradcam   the compiled Grad-CAM pass (forward + backward to the last
               (H, W, C) layer, top-1 class) and the copy of its heatmaps
  j  cam job   analyze_cam(): decode + preprocess, the Grad-CAM pass, heatmap,
               overlay and values files, manifest bytes: a Grad-CAM job's
               engine work, beside c, an activations job's
  b  classic   load_img + x/255, the book's activation model (built once)
               .predict(x), then per layer its display_grid (16 channels per
               row, per-channel mean/std * 64 + 128) drawn with plt.imshow and
               written with plt.savefig; one image

Per image: ms, device-to-host bytes, and host ms (c - d: what the host adds).
Warm runs only (one untimed run each first), cases interleaved round by
round; medians over --repeats (--classic-repeats for b).
Targets: b / c >= 10; c / a <= 2.0 on CPU at batch 1; on an accelerator, the
engine's images/s >= 50% of the forward pass's at the same batch size.
Never asserts; prints a table.

    python bench/bench_engine.py [--repeats 20] [--classic-repeats 5] [--batch 8]
    KERAS_BACKEND=jax python bench/bench_engine.py --batch 8,32   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import itertools
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import get_ident

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from producer.contract import JobOptions  # noqa: E402
from producer.settings import Settings  # noqa: E402
from producer.storage import FileStore, put_many  # noqa: E402
from worker.engine import RenderKey, analyze, manifest_bytes, open_model, preprocess  # noqa: E402
from worker.engine.cam_pass import analyze_cam, cam_of  # noqa: E402
from worker.engine.compiled import (  # noqa: E402
    accelerated,
    compile_program,
    padded_size,
    reduces_on_host,
    run_sized,
    split_sizes,
    takes_any_batch,
    to_host,
)
from worker.report import render_report  # noqa: E402

SPEC = ":8"
IMAGES_PER_ROW = 16


def classic_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = keras.layers
    stack: list = [keras.Input((150, 150, 3))]
    for filters in (32, 64, 128, 128):
        stack += [layers.Conv2D(filters, 3, activation="relu"), layers.MaxPooling2D(2)]
    stack += [
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(512, activation="relu"),
        layers.Dense(1, activation="sigmoid"),
    ]
    return keras.Sequential(stack, name="cats_and_dogs_small")


def sample_image(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients plus noise (seeded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17 + yy / 23)], axis=-1)
    pixels = np.clip(base * 220 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def activation_model(model: keras.Model) -> keras.Model:
    """The book's multi-output model over the first 8 layers, built once."""
    layer_outputs = [layer.output for layer in model.layers[:8]]
    return keras.Model(inputs=model.inputs, outputs=layer_outputs)


def classic_recipe(
    model: keras.Model, data: bytes, out_dir: Path, activations_of: keras.Model | None = None
) -> None:
    """The book's approach, step by step (Deep Learning with Python, 5.4.1)."""
    img = keras.utils.load_img(io.BytesIO(data), target_size=(150, 150))
    x = keras.utils.img_to_array(img)[None] / 255.0
    activations = (activations_of or activation_model(model)).predict(x, verbose=0)
    layer_names = [layer.name for layer in model.layers[:8]]
    for layer_name, layer_activation in zip(layer_names, activations, strict=True):
        n_features = layer_activation.shape[-1]
        size = layer_activation.shape[1]
        n_cols = n_features // IMAGES_PER_ROW
        display_grid = np.zeros((size * n_cols, IMAGES_PER_ROW * size))
        for col in range(n_cols):
            for row in range(IMAGES_PER_ROW):
                channel_image = layer_activation[0, :, :, col * IMAGES_PER_ROW + row]
                channel_image -= channel_image.mean()
                channel_image /= channel_image.std()
                channel_image *= 64
                channel_image += 128
                channel_image = np.clip(channel_image, 0, 255).astype("uint8")
                display_grid[col * size : (col + 1) * size, row * size : (row + 1) * size] = (
                    channel_image
                )
        scale = 1.0 / size
        plt.figure(figsize=(scale * display_grid.shape[1], scale * display_grid.shape[0]))
        plt.title(layer_name)
        plt.grid(False)
        plt.imshow(display_grid, aspect="auto", cmap="viridis")
        plt.savefig(out_dir / f"{layer_name}.png")
        plt.close()


def measure(cases: dict[str, tuple[Callable[[], object], int]]) -> dict[str, tuple[float, float]]:
    """{name: (fn, repeats)} -> {name: (median ms, min ms)}.

    Every case runs once untimed (warm: graphs, caches, colormap LUT), then
    the cases take turns round by round, so load from other processes on a
    shared machine falls on all of them alike.
    """
    for fn, _ in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(max(n for _, n in cases.values())):
        for name, (fn, repeats) in cases.items():
            if round_ < repeats:
                started = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def cpu_per_call(
    cases: dict[str, Callable[[], object]],
    clock: Callable[[], float],
    rounds: int = 15,
    calls: int = 10,
    between: Callable[[], object] | None = None,
) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median CPU ms by `clock`, in seconds) per call}, the cases
    taking turns round by round; `between` runs after each case's calls, untimed."""
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            started, cpu_started = time.perf_counter(), clock()
            for _ in range(calls):
                fn()
            cpu[name].append((clock() - cpu_started) * 1000.0 / calls)
            wall[name].append((time.perf_counter() - started) * 1000.0 / calls)
            if between is not None:
                between()
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in cases}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()}"


def forward_only(extractor: object) -> Callable[[np.ndarray], object]:
    """The compiled forward pass, each output summed on the device so it is computed."""
    program = compile_program(extractor.model, lambda outs: [keras.ops.sum(o) for o in outs])
    return lambda batch: to_host(program(batch))


def eager(extractor: object, batch: np.ndarray) -> list[np.ndarray]:
    """The extractor model called eagerly, every output copied to the host as float32."""
    outputs = extractor.model(batch, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float32) for t in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--classic-repeats", type=int, default=5)
    parser.add_argument("--batch", default="8", help="larger batch sizes, comma-separated")
    args = parser.parse_args()

    settings = Settings()
    options = JobOptions(layers=SPEC)
    key = RenderKey.of(options, settings)
    sizes = sorted({1, *(max(1, int(b)) for b in args.batch.split(","))})
    images = [sample_image(seed=i) for i in range(max(sizes))]
    model = classic_cnn()
    with tempfile.TemporaryDirectory(prefix="actviz-bench-") as tmp:
        path = Path(tmp) / "cats_and_dogs_small.keras"
        model.save(path)
        loaded = open_model(path)
        extractor = loaded.extractor(SPEC)
        pixels = np.stack(
            [
                preprocess(data, loaded.input_shape, options, settings, loaded.auto_scale).pixels
                for data in images
            ]
        )
        grids = Path(tmp) / "classic"
        grids.mkdir()
        book = activation_model(loaded.model)
        forward = forward_only(extractor)

        cam_options = JobOptions()  # Grad-CAM's defaults: the top-1 class, the last (H, W, C) layer
        cam, cam_key, cam_row = cam_of(loaded, cam_options)

        def cam_job(n: int) -> Callable[[], bytes]:
            def run() -> bytes:
                return b"".join(
                    manifest_bytes(r.manifest)
                    for r in analyze_cam(loaded, images[:n], cam_options, settings)
                )

            return run

        def reduced(batch: np.ndarray, on_host: bool | None = None) -> list[object]:
            """The pass with every (layer, image) taken: reduced wherever this device does."""
            done = extractor.reduce(batch, key, on_host)
            return [done.layer(i, p) for i in range(len(done)) for p in range(len(batch))]

        def engine(n: int) -> Callable[[], bytes]:
            def run() -> bytes:
                return b"".join(
                    manifest_bytes(r.manifest)
                    for r in analyze(loaded, images[:n], options, settings)
                )

            return run

        cases: dict[str, tuple[Callable[[], object], int]] = {
            "b": (
                lambda: classic_recipe(loaded.model, images[0], grids, book),
                args.classic_repeats,
            )
        }
        for n in sizes:
            cases[f"a{n}"] = (lambda n=n: forward(pixels[:n]), args.repeats)
            cases[f"e{n}"] = (lambda n=n: eager(extractor, pixels[:n]), args.repeats)
            cases[f"d{n}"] = (lambda n=n: reduced(pixels[:n]), args.repeats)
            cases[f"c{n}"] = (engine(n), args.repeats)
            rows = np.array([cam_row] * n, dtype=np.int32)
            cases[f"g{n}"] = (lambda n=n, r=rows: cam.run(pixels[:n], r, cam_key), args.repeats)
            cases[f"j{n}"] = (cam_job(n), args.repeats)
        # A pass whose size is no power of two (the batcher forms them under load): padded
        # with blank images to one program, or split into powers of two.
        odd = max(sizes) - 3
        if odd >= 3:
            for policy, pad in (("pad", True), ("split", False)):
                cases[policy] = (
                    lambda pad=pad: run_sized(extractor.program(key), (pixels[:odd],), (0.0,), pad),
                    args.repeats,
                )
            # The host's program (float32 outputs), which takes any pass size on TensorFlow:
            # the pass whole, and as the power-of-two pieces it ran as before.
            host = extractor.program(None)
            if takes_any_batch(host):
                pieces = list(itertools.accumulate(split_sizes(odd), initial=0))
                cases["host whole"] = (lambda: to_host(host(pixels[:odd])), args.repeats)
                cases["host split"] = (
                    lambda: [to_host(host(pixels[a:b])) for a, b in itertools.pairwise(pieces)],
                    args.repeats,
                )
        timed = measure(cases)
        # The pass at the largest batch, reduced by the program and on the host: wall time
        # and the whole process's CPU (both use TensorFlow's pools, the host's loops not).
        # A GPU node's kit (bench/gpu_kit.sh) carries no numba: its workers reduce on the device.
        top = max(sizes)
        sides = [("program", False)]
        if importlib.util.find_spec("numba") is not None:
            sides.append(("host", True))
        where = cpu_per_call(
            {
                side: lambda on_host=on_host: reduced(pixels[:top], on_host)
                for side, on_host in sides
            },
            time.process_time,
            rounds=max(3, args.repeats // 2),
            calls=1,
        )
        d2h = {n: extractor.reduce(pixels[:n], key).d2h_bytes / n for n in sizes}
        results = analyze(loaded, images[:1], options, settings)
        floats = extractor.output_bytes(pixels.shape[1:])
        # What the worker adds for each job on the host: its manifest, its report page,
        # and storing its files: in this thread, as the worker writes a local folder, and
        # through a pool of threads, as it sends S3 PUTs.
        manifest = results[0].manifest
        job_files = {
            **results[0].files,
            **render_report(manifest),
            "manifest.json": manifest_bytes(manifest),
        }
        stored = itertools.count()

        # The CPU of this thread and the pool's threads only: TensorFlow's own threads
        # may still be spinning from the passes above.
        pool_threads: list[int] = []
        uploads = ThreadPoolExecutor(8, initializer=lambda: pool_threads.append(get_ident()))

        def store_clock() -> float:
            return time.thread_time() + sum(
                time.clock_gettime(time.pthread_getcpuclockid(t)) for t in pool_threads
            )

        class PooledFolder(FileStore):
            concurrent_puts = True  # put_many sends its objects through the pool

        def store_job(pool: ThreadPoolExecutor | None = None) -> None:
            store = (FileStore if pool is None else PooledFolder)(Path(tmp) / "store")
            prefix = f"jobs/{next(stored)}/"
            put_many(store, [(prefix + name, data) for name, data in job_files.items()], pool=pool)

        per_job = measure(
            {
                "manifest": (lambda: manifest_bytes(manifest), args.repeats),
                "report": (lambda: render_report(manifest), args.repeats),
            }
        )
        store_job(), store_job(uploads)  # the folder made, the pool's threads started

        def clear_store() -> None:
            # Untimed: the stored jobs deleted, so that the folder does not grow by hundreds
            # of MB. On a virtual machine, writing memory the guest had not used yet cost
            # up to ten times the CPU: that, not the store, is what the figure measured.
            shutil.rmtree(Path(tmp) / "store" / "jobs", ignore_errors=True)

        stores = cpu_per_call(
            {"here": store_job, "pool": lambda: store_job(uploads)},
            store_clock,
            between=clear_store,
        )
        uploads.shutdown()

    print(f"actviz engine benchmark  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {machine()}; keras {keras.__version__} ({keras.backend.backend()}); {device()}"
    )
    print(f"model: {model.name}, 150x150x3, layers '{SPEC}'; images 320x240 JPEG")
    print("classic: book approach (activation model built once; display_grid + imshow + savefig)")
    print()
    print(f"{'case':<44}{'batch':>6}{'ms/img':>9}{'min':>8}{'img/s':>9}{'D2H KB/img':>12}")
    b = timed["b"]
    print(
        f"{'b  classic: predict + imshow/savefig':<44}{1:>6}{b[0]:>9.1f}{b[1]:>8.1f}{1000 / b[0]:>9.1f}"
    )
    labels = {
        "e": "e  eager forward + float32 copy (before)",
        "a": "a  forward (compiled, outputs on device)",
        "d": "d  device pass (forward + reduce + copy)"
        if accelerated()
        else "d  pass (forward, reduce on the host)",
        "c": "c  engine: analyze() + manifest bytes",
        "g": "g  Grad-CAM pass (forward + backward + copy)",
        "j": "j  Grad-CAM job: analyze_cam() + manifest",
    }
    for n in sizes:
        for case, label in labels.items():
            med, low = timed[f"{case}{n}"]
            kb = {"d": f"{d2h[n] / 1024:>12.1f}", "e": f"{floats / 1024:>12.1f}"}.get(case, "")
            print(f"{label:<44}{n:>6}{med / n:>9.2f}{low / n:>8.2f}{1000 * n / med:>9.1f}{kb}")
    print("(D2H for e: the float32 copy of every layer, which the engine no longer makes)")
    if not accelerated():
        print("(D2H for d on a CPU: its float32 outputs, reduced on the host where they are)")
    print()
    c1, a1 = timed["c1"][0], timed["a1"][0]
    print(f"b / c = {b[0] / c1:6.1f}x   (target >= 10: engine vs classic, one image)")
    print(f"c / a = {c1 / a1:6.2f}x   (target <= 2.0 on CPU: engine vs bare forward pass, batch 1)")
    print(
        f"c / e = {c1 / timed['e1'][0]:6.2f}x   (the same against the eager forward pass, batch 1)"
    )
    for n in sizes:
        c, a, d = timed[f"c{n}"][0], timed[f"a{n}"][0], timed[f"d{n}"][0]
        print(
            f"batch {n}: engine = {a / c:5.0%} of the forward-only rate (target >= 50% on a GPU); "
            f"host adds {(c - d) / n:.2f} ms/img to the device pass"
        )
    for n in sizes:
        c, a, g, j = (timed[f"{case}{n}"][0] for case in "cagj")
        print(
            f"batch {n}: a Grad-CAM job costs {j / c:.2f}x an activations job ({j / n:.2f} "
            f"against {c / n:.2f} ms/img); its pass {g / a:.2f}x the forward pass "
            f"(layer {cam.ref.name}, top-1 class)"
        )
    program, host = where["program"], where.get("host")
    print(
        f"batch {top}, the pass reduced in its program: {program[0] / top:.2f} ms/img "
        f"({program[1] / top:.2f} of CPU); "
        + (
            f"on the host: {host[0] / top:.2f} ms/img ({host[1] / top:.2f} of CPU); "
            f"host / program CPU {host[1] / program[1]:.2f}x "
            if host
            else "on the host: not measured (numba is not installed) "
        )
        + f"(this device: {'host' if reduces_on_host() else 'program'})"
    )
    # A pass of `odd` images run whole or padded, and split: (what, its two cases, the
    # first's name and short name, how a CPU runs it).
    passes = [
        ("device pass", "pad", "split", f"padded to {padded_size(odd)}", "padded", "split"),
        ("the host's program, forward only", "host whole", "host split", "whole", "whole", "whole"),
    ]
    pieces = " + ".join(map(str, split_sizes(odd)))
    for what, case, split_case, first, short, on_cpu in passes:
        if case in timed:
            one, split = timed[case][0] / odd, timed[split_case][0] / odd
            print(
                f"a pass of {odd} ({what}, ms/img): {first} {one:.2f}, split {pieces} "
                f"{split:.2f}; split / {short} {split / one:.2f}x "
                f"(this device: {short if accelerated() else on_cpu})"
            )
    print(
        f"per job on the host: manifest JSON {per_job['manifest'][0]:.2f} ms "
        f"({len(manifest_bytes(manifest)) / 1024:.0f} KB), report page "
        f"(index.html + depth.svg) {per_job['report'][0]:.2f} ms"
    )
    print(
        f"storing a job's {len(job_files)} files "
        f"({sum(map(len, job_files.values())) / 1024:.0f} KB) in a local folder: in this "
        f"thread {stores['here'][0]:.2f} ms ({stores['here'][1]:.2f} ms of CPU), through a "
        f"pool of 8 threads {stores['pool'][0]:.2f} ms ({stores['pool'][1]:.2f} ms of CPU)"
    )
    stages = results[0].manifest["timings_ms"]
    print(
        "engine stages (one run, one image, ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
    )


def device() -> str:
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return f"device {jax.devices()[0].device_kind}"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return f"device {gpus[0].name}" if gpus else "device CPU"
    except Exception as exc:  # noqa: BLE001 (a label only)
        return f"device unknown ({exc})"
    return "device CPU"


if __name__ == "__main__":
    main()
