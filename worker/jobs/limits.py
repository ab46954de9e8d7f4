"""Soft and hard time limits for the solo pool, which Celery does not enforce itself.

The worker runs jobs in its main thread (one process per GPU, see worker/main.py),
so the soft limit is a SIGALRM that raises SoftTimeLimitExceeded inside the job,
and the hard limit is a watchdog that ends the process: the message was not
acknowledged (acks_late), so the broker hands it out again after the
visibility timeout, and the orchestrator restarts the worker.

The watchdog, and the soft limit of a job on a pool thread, are entries of one
timer thread per process (Celery's `timer2.Timer`): starting two
`threading.Timer` threads per job cost about 0.65 ms of CPU a job, and more
under load. An entry may fire up to 2 s late (the timer's longest sleep).

The watchdog is a Python thread, so it needs the interpreter lock; code that
holds the lock without returning to the interpreter (a C extension, a
backtracking regex) would keep it from ever running. Behind it stands
`faulthandler`'s timer, a C thread that needs no lock: `BACKSTOP_GRACE_S`
after the earliest hard deadline of the jobs running in the process it
writes every thread's stack to stderr and exits the process (status 1).
"""

from __future__ import annotations

import ctypes
import faulthandler
import itertools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.timer2 import Timer

log = logging.getLogger(__name__)

HARD_LIMIT_EXIT = 70
BACKSTOP_GRACE_S = 5.0
# Deadlines are rounded up to this step, so jobs that end in order rarely move the
# timer: re-arming it stops and starts faulthandler's watchdog thread, which cost
# a loaded worker about 7% of its interpreter-lock time when done twice per job.
BACKSTOP_STEP_S = 5.0


class _Backstop:
    """One faulthandler timer for the process, armed at the earliest hard deadline.

    A deadline is the job's hard limit + BACKSTOP_GRACE_S, rounded up to a
    multiple of BACKSTOP_STEP_S: the backstop ends a stuck process 5 to 10 s
    after the hard limit. The timer is re-armed only when the earliest
    deadline changes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[int, float] = {}
        self._tokens = itertools.count()
        self._armed: float | None = None

    def add(self, seconds: float) -> int:
        token = next(self._tokens)
        due = time.monotonic() + seconds + BACKSTOP_GRACE_S
        due = math.ceil(due / BACKSTOP_STEP_S) * BACKSTOP_STEP_S
        with self._lock:
            self._deadlines[token] = due
            self._arm()
        return token

    def remove(self, token: int) -> None:
        with self._lock:
            self._deadlines.pop(token, None)
            self._arm()

    def _arm(self) -> None:
        earliest = min(self._deadlines.values()) if self._deadlines else None
        if earliest == self._armed:
            return
        faulthandler.cancel_dump_traceback_later()
        self._armed = earliest
        if earliest is not None:
            delay = max(0.1, earliest - time.monotonic())
            faulthandler.dump_traceback_later(delay, exit=True, file=sys.__stderr__)


_backstop = _Backstop()


# Celery's timer thread (a heap of entries, one thread), started at its first entry. It
# sleeps until its next entry but at most `max_interval` s, and an entry added meanwhile
# waits for that sleep to end: kombu's default (2 s) would hold a stage report due in
# 250 ms for up to 2 s. At 0.1 s it wakes ten times a second while entries wait.
TIMER_TICK_S = 0.1
_timer = Timer(max_interval=TIMER_TICK_S)


def process_timer() -> Timer:
    """The process's one timer thread, for short deferred work (time limits, stage reports)."""
    return _timer


def _raise_soft_limit(signum: int, frame: object) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def _raise_in_thread(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(SoftTimeLimitExceeded)
    )


def _end_process(job_id: str, seconds: float) -> None:
    log.critical("job %s ran past the hard time limit (%s s); ending the worker", job_id, seconds)
    logging.shutdown()
    os._exit(HARD_LIMIT_EXIT)


@contextmanager
def time_limits(job_id: str, soft: float, hard: float, *, may_exit: bool) -> Iterator[None]:
    """Bound the block by `soft` seconds (exception) and `hard` seconds (process exit).

    Signals only work in the main thread; on a pool thread of a real worker
    the soft limit is an asynchronous exception instead, and in the embedded
    worker thread the limits are not enforced. `may_exit=False` disables the hard
    limit, e.g. inside a user's own process.
    """
    in_main = threading.current_thread() is threading.main_thread()
    use_alarm = in_main and soft > 0 and hasattr(signal, "setitimer")
    watchdog = backstop = None
    if may_exit and hard > 0:
        watchdog = _timer.call_after(hard, _end_process, (job_id, hard))
        backstop = _backstop.add(hard)
    soft_timer = None
    if may_exit and soft > 0 and not in_main:
        # A job on a pool thread (a batching worker): the exception is raised in
        # that thread at its next Python instruction.
        soft_timer = _timer.call_after(soft, _raise_in_thread, (threading.get_ident(),))
    previous = None
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _raise_soft_limit)
        signal.setitimer(signal.ITIMER_REAL, soft)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous or signal.SIG_DFL)
        if watchdog is not None:
            watchdog.cancel()
            _backstop.remove(backstop)
        if soft_timer is not None:
            soft_timer.cancel()
