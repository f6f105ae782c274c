"""Progress lines for long evaluations: count done, rate and ETA, at most every few seconds."""

from __future__ import annotations

import time
from typing import Optional

from absl import logging


class ProgressLog:
    """Logs ``<what>: done/total <unit> (rate <unit>/s, ETA ...)`` through absl.logging.

    Args:
      what: the task, e.g. 'spatial_grid'.
      total: the number of items expected, or None when unknown (no ETA then).
      unit: what is counted, e.g. 'images' or 'transforms'.
      every_secs: minimum time between two lines (the last item is always logged).
    """

    def __init__(self, what: str, total: Optional[int], unit: str = "images",
                 every_secs: float = 10.0):
        self.what, self.total, self.unit, self.every_secs = what, total, unit, every_secs
        self.done = 0
        self._start = time.time()
        self._last = self._start

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.time()
        finished = self.total is not None and self.done >= self.total
        if not finished and now - self._last < self.every_secs:
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            logging.info("%s: %d %s (%.2f %s/s)", self.what, self.done, self.unit, rate,
                         self.unit)
            return
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logging.info("%s: %d/%d %s (%.2f %s/s, ETA %s)", self.what, self.done, self.total,
                     self.unit, rate, self.unit, format_seconds(eta))


def format_seconds(seconds: float) -> str:
    """``75`` -> ``'1m15s'``; hours shown when needed."""
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
