"""actviz worker: the activation engine and the Celery service around it.

Needs the heavy install: `pip install 'actviz[worker]'`.
"""
