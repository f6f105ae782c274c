"""Progress lines for long jobs: items done, items per second and ETA, now and then.

One class for every long loop (conversions, LLR attacks and evaluations), so that all of them
log the same line: ``<what>: done/total <unit> (percent, rate <unit>/s, ETA 1m15s)``.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from absl import logging


class ProgressLog:
    """Counts finished items and logs a progress line through absl.logging.

    A line is logged when ``every_secs`` passed since the last one, or every ``every_n``
    items when that is given, and always for the last item. ``update`` may be called from
    several threads (the ImageNet converter's shard writers share one log).

    Args:
      what: the job, e.g. 'spatial_grid batch 1' or 'train.tfrecord'.
      total: the number of items expected, or None when unknown (no percentage nor ETA then).
      unit: what is counted, e.g. 'images' or 'transforms'.
      every_secs: minimum time between two lines.
      every_n: log every that many items instead of by time.
    """

    def __init__(self, what: str, total: Optional[int], unit: str = "images",
                 every_secs: float = 10.0, every_n: Optional[int] = None):
        self.what, self.total, self.unit = what, total, unit
        self.every_secs, self.every_n = every_secs, every_n
        self.done = 0
        self._start = self._last = time.time()
        self._lock = threading.Lock()

    def update(self, count: int = 1) -> None:
        """Counts ``count`` more items; logs when it is time (or the job is finished)."""
        with self._lock:
            before, self.done = self.done, self.done + count
            done, now = self.done, time.time()
            finished = self.total is not None and done >= self.total
            if self.every_n:
                due = done // self.every_n > before // self.every_n
            else:
                due = now - self._last >= self.every_secs
            if not (finished or due):
                return
            self._last = now
        rate = done / max(now - self._start, 1e-9)
        if self.total is None:
            logging.info("%s: %d %s (%.2f %s/s)", self.what, done, self.unit, rate, self.unit)
            return
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        logging.info("%s: %d/%d %s (%.1f%%, %.2f %s/s, ETA %s)", self.what, done, self.total,
                     self.unit, 100.0 * done / max(self.total, 1), rate, self.unit,
                     format_seconds(eta))


def format_seconds(seconds: float) -> str:
    """``75`` -> ``'1m15s'``; hours shown when needed, ``'?'`` for an unknown time."""
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
