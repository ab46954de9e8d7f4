"""Micro-batching logic, pure: which waiting images share a forward pass, and when it runs."""

from __future__ import annotations

from producer.settings import Settings
from worker.runtime.batcher import Pending, batch_ready, group_key, images_per_pass, take_batch
from worker.runtime.pool import THREAD_POOL, pool_for


def pending(key: object, arrived: float = 0.0, name: str = "") -> Pending:
    return Pending(key=key, arrived=arrived, payload=name)


def test_same_extractor_and_shape_share_a_group_other_models_do_not() -> None:
    model_a, model_b = object(), object()
    assert group_key(model_a, (150, 150, 3)) == group_key(model_a, (150, 150, 3))
    assert group_key(model_a, (150, 150, 3)) != group_key(model_b, (150, 150, 3))
    assert group_key(model_a, (150, 150, 3)) != group_key(model_a, (64, 64, 3))


def test_take_batch_takes_the_oldest_group_up_to_the_batch_size_in_order() -> None:
    queue = [
        pending("a", name="a1"),
        pending("b", name="b1"),
        pending("a", name="a2"),
        pending("a", name="a3"),
        pending("b", name="b2"),
    ]
    batch = take_batch(queue, batch_size=2)
    assert [p.payload for p in batch] == ["a1", "a2"]
    assert [p.payload for p in queue] == ["b1", "a3", "b2"]
    assert [p.payload for p in take_batch(queue, batch_size=8)] == ["b1", "b2"]
    assert [p.payload for p in queue] == ["a3"]
    assert take_batch([], batch_size=4) == []


def test_batch_runs_when_full_or_waited_long_enough_or_nothing_else_is_coming() -> None:
    queue = [pending("a", arrived=10.0), pending("b", arrived=10.001), pending("a", arrived=10.002)]
    # Two of 'a' waiting, two more jobs on their way, 15 ms budget: keep waiting.
    assert not batch_ready(queue, batch_size=4, wait_s=0.015, now=10.005, incoming=2)
    assert batch_ready(queue, batch_size=2, wait_s=0.015, now=10.005, incoming=2)  # full
    assert batch_ready(queue, batch_size=4, wait_s=0.015, now=10.016, incoming=2)  # waited
    assert batch_ready(queue, batch_size=4, wait_s=0.015, now=10.005, incoming=0)  # alone
    assert not batch_ready([], batch_size=1, wait_s=0.0, now=10.0, incoming=0)


def test_a_pass_is_bounded_in_bytes_as_well_as_in_images() -> None:
    mb = 2**20
    assert images_per_pass(8, 1024 * mb, 10 * mb) == 8  # small images: the batch size
    assert images_per_pass(8, 100 * mb, 30 * mb) == 3  # large ones: what fits the bytes
    assert images_per_pass(8, 100 * mb, 300 * mb) == 1  # one image past the bound still runs
    assert images_per_pass(8, 100 * mb, 0) == 8


def test_batch_size_one_keeps_the_solo_pool_and_larger_sizes_reserve_two_batches() -> None:
    redis = "redis://127.0.0.1:6379/0"
    assert pool_for(Settings(broker_url=redis, batch_size=1)) == ("worker.runtime.pool:SoloPool", 1)
    assert pool_for(Settings(broker_url=redis, batch_size=8)) == (THREAD_POOL, 16)
    assert pool_for(Settings(batch_size=8))[1] == 1  # the embedded worker never batches


def test_soft_time_limit_interrupts_a_job_on_a_pool_thread() -> None:
    import threading
    import time

    from celery.exceptions import SoftTimeLimitExceeded

    from worker.jobs.limits import time_limits

    outcome: list[str] = []

    def job() -> None:
        try:
            with time_limits("job-1", soft=0.2, hard=0, may_exit=True):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            outcome.append("ran to the end")
        except SoftTimeLimitExceeded:
            outcome.append("soft limit")

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(15)
    assert outcome == ["soft limit"]
