"""The actviz Celery app as an importable module, for Celery's own tools.

    celery -A producer.celery_app inspect ping       # every worker answers, even mid-job
    celery -A producer.celery_app inspect active     # the jobs each worker is running
    celery -A producer.celery_app purge -Q gpu -f    # every priority list of the queue
    celery -A producer.celery_app control enable_events  # off unless asked (or Flower runs)
    celery -A producer.celery_app events --dump      # task-received/started/succeeded...
    celery -A producer.celery_app flower             # its broker view counts every list

Configured from the environment as `actviz` is (ACTVIZ_BROKER_URL and the rest), with
the configuration workers use: JSON only, the queues, and the ten priority steps that
Redis keeps as one list each. Without them a tool sees only the first list of a queue
(`celery purge` with Celery's defaults emptied 2 of 5 queued jobs). It is the light
producer app: importing it needs no TensorFlow and starts nothing.
"""

from __future__ import annotations

from producer.broker import create_app
from producer.settings import Settings

app = create_app(Settings.from_env())
