"""A worker process's share of the host's cores: what its thread and process pools are sized to.

`actviz worker` may run several solo processes on one host (`--concurrency`,
`--per-device`); it tells each child how many there are
(`ACTVIZ_HOST_PROCESSES`). A pool sized to every core of the host in each of
12 processes would start 12 times the threads the cores can run: 192 encode
threads and 48 report helpers on a 16-core node, contending for the cores and
for each process's interpreter lock.
"""

from __future__ import annotations

import os

from producer.settings import Settings

MIN_RENDER_THREADS = 2  # a pass's PNGs are encoded while its next pass's Python runs
MAX_REPORT_HELPERS = 4
# Below this share the cores, not the interpreter lock, bound a worker process, and a
# helper's pipe costs more than the lock time it frees: on 2 cores, a report rendered
# in the job's thread cost 2.5 ms of CPU a job less, at the same jobs/s.
MIN_SHARE_FOR_HELPERS = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def core_share(settings: Settings, cores: int | None = None) -> int:
    """This process's share of `cores` (default: usable_cores()), at least 1."""
    total = usable_cores() if cores is None else cores
    return max(1, total // max(1, settings.host_processes))


def render_threads(settings: Settings, cores: int | None = None) -> int:
    """Threads that encode a pass's PNGs: the process's core share, at least 2."""
    return max(MIN_RENDER_THREADS, core_share(settings, cores))


def loaded_render_threads(threads: int, on_host: bool) -> int:
    """Render threads for a pass while other jobs are in the worker's batcher: on a CPU
    (`on_host`, the layers reduced on the host), one fewer, at least 1. Those cores also
    run TensorFlow's pool for the next pass and the jobs' own threads: on 2 cores, at 16
    jobs in flight, 11-13% more jobs/s for 10-11% less CPU a job than two threads always;
    a job alone renders on both (one thread always took 21 ms a job against 17)."""
    return max(1, threads - 1) if on_host else threads


def backend_threads(settings: Settings, cores: int | None = None) -> tuple[int, int] | None:
    """TensorFlow's (intra-op, inter-op) threads for a CPU worker process that shares its
    host with others: its core share for each op, and one op at a time (a CNN's ops run
    in a chain); None, TensorFlow's default, for a process alone on its host.
    TensorFlow's default, every core for each op and as many ops at once in each process,
    starts K times the threads the cores can run in K processes: two worker processes on
    2 cores served 94-95 jobs/s with it, 102-106 with these (docs/benchmarks.md). A
    process alone served 1-6% less with these in 3 of 4 pairs, so it keeps the default."""
    if settings.host_processes <= 1:
        return None
    return core_share(settings, cores), 1


def report_helpers(settings: Settings, cores: int | None = None) -> int:
    """Helper processes that render reports: half the core share, up to 4 (a report is a
    few ms of a job's CPU; each helper is an interpreter of its own); none, the report
    rendered in the job's thread, for a share below MIN_SHARE_FOR_HELPERS."""
    share = core_share(settings, cores)
    if share < MIN_SHARE_FOR_HELPERS:
        return 0
    return min(MAX_REPORT_HELPERS, share // 2)
