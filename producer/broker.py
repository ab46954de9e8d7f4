"""The Celery configuration both sides share, and the light app a producer sends with.

The worker builds its app from the same `celery_config(settings)` and adds its
own worker-side options, so the two can never disagree on serializer, queues,
priorities or the Redis visibility timeout.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from producer.contract import MAX_PRIORITY, QUEUE_GPU, QUEUES, TASK_NAME
from producer.settings import RESTORE_EVERY_S, Settings, redact_url

RESTORE_MUTEX_S = 5


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "sentinel://"))


def _sentinel(url: str) -> bool:
    """`sentinel://h1:26379;sentinel://h2:26379`: Redis behind Sentinels, which name the
    primary; a failover moves producers and workers to the new one."""
    return url.startswith("sentinel://")


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options. On Redis a job held by a worker that stopped re-stamping
    it (worker/transport.py) goes back to its queue `visibility_timeout` s later."""
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if _is_redis(settings.broker_url):
        # Redis emulates priorities with one list per step; lower numbers are served first.
        options.update(
            queue_order_strategy="priority",
            priority_steps=list(range(MAX_PRIORITY + 1)),
            # A dead worker's job is found again within a second of its timeout (kombu's
            # default sweeps every 100 s); the worker's transport re-stamps held ones
            # every `actviz_heartbeat` s (the stock transport ignores the option).
            unacked_restore_interval=RESTORE_EVERY_S,
            unacked_restore_throttle=1,
            # The sweep's lock: kombu keeps it 300 s, so a worker killed during a sweep
            # (milliseconds) stopped every restore for 5 minutes. Restores are
            # transactions (WATCH), so two sweeps at once restore each message once.
            unacked_mutex_expire=RESTORE_MUTEX_S,
            actviz_heartbeat=settings.heartbeat_s,
        )
    if _sentinel(settings.broker_url):
        options["master_name"] = settings.sentinel_master
    if settings.embedded:
        # The in-process broker is polled; keep the embedded round trip snappy.
        options["polling_interval"] = 0.05
    return options


def backend_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if _sentinel(settings.backend_url):
        options["master_name"] = settings.sentinel_master
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration shared by producer and worker apps: JSON only, two queues."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "broker_transport_options": transport_options(settings),
        "result_backend_transport_options": backend_options(settings),
        "task_default_queue": QUEUE_GPU,
        # Each queue gets its own exchange and key, so 'cpu' jobs never reach 'gpu' workers.
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_routes": {TASK_NAME: {"queue": QUEUE_GPU}},
        "result_expires": settings.result_expires,
        "result_extended": True,
        "broker_connection_retry_on_startup": True,
        # Celery's own STARTED write (a GET and a MULTI a job, and a message to every
        # watcher) only where no job registry records each job's start (the embedded
        # mode): with a Redis backend, Job.state() reads "started" from the registry
        # (producer/job_registry.py), which the worker marks in the round trip that
        # admits the job (worker/jobs/deliveries.py).
        "task_track_started": not _is_redis(settings.backend_url),
        "timezone": "UTC",
    }
    if settings.broker_url.startswith("rediss://") and "ssl_cert_reqs" not in settings.broker_url:
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    backend = settings.backend_url
    if backend.startswith("rediss://") and "ssl_cert_reqs" not in backend:
        config["redis_backend_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def create_app(settings: Settings, name: str = "actviz") -> Celery:
    """A Celery app configured from `settings`; it knows the task only by name."""
    if _sentinel(settings.broker_url):
        from producer import sentinel

        sentinel.install()  # kombu's own ends a failover with AttributeError
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


SHOWN_FIELDS = ("job_id", "kind", "model", "image", "batch_id")


def send_job(app: Celery, message: dict[str, Any], job_id: str, **options: Any) -> None:
    """Queue a job's message under its id (`options`: queue, priority), with the summary
    of it that monitors show (`arguments_shown`)."""
    app.send_task(
        TASK_NAME,
        args=[message],
        task_id=job_id,
        argsrepr=arguments_shown(message),
        kwargsrepr="{}",
        **options,
    )


def arguments_shown(message: dict[str, Any]) -> str:
    """What monitors (Flower, `celery events`) show as a job's arguments: its id, kind,
    model and image, URLs without their passwords. Celery would otherwise walk the whole
    message with its safe repr, about a fifth of a submit's CPU."""
    fields = message if isinstance(message, dict) else {}
    shown = {name: fields[name] for name in SHOWN_FIELDS if fields.get(name) is not None}
    for name in ("model", "image"):
        if isinstance(shown.get(name), str):
            shown[name] = redact_url(shown[name])
    return repr([shown])
