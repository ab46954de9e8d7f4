"""A bound on how many pixels a worker process decodes at once.

Concurrent jobs each decode their image (worker/runtime/batcher.py). Without a
bound, 16 jobs of 24-megapixel PNGs hold 16 x 72 MB of decoded pixels at the
same moment. A job reserves its image's decoded pixels (from the header,
`worker.engine.preprocess.decoded_pixels`) before decoding and gives them
back once its image is resized to the model's input; a job whose image does
not fit waits. An image larger than the whole budget decodes alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

WAIT_POLL_S = 0.1  # a waiting job wakes this often, so a soft time limit can land


class PixelBudget:
    def __init__(self, pixels: int) -> None:
        self.limit = max(1, pixels)
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        pixels = max(0, pixels)
        with self._cond:
            while self.in_flight and self.in_flight + pixels > self.limit:
                self._cond.wait(WAIT_POLL_S)
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= pixels
                self._cond.notify_all()
