"""Rate-limited warnings, so a misbehaving guest cannot flood the journal."""

from __future__ import annotations

import time
from typing import Any


class RateLimitedLog:
    """At most `burst` warnings per `period` seconds; the next one allowed says how many were dropped."""

    def __init__(self, log: Any, burst: int = 5, period: float = 60.0) -> None:
        self._log = log
        self._burst = burst
        self._period = period
        self._window_start = time.monotonic()
        self._count = 0
        self._suppressed = 0

    def warning(self, event: str, **kw: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            self._window_start, self._count = now, 0
        if self._count >= self._burst:
            self._suppressed += 1
            return
        self._count += 1
        if self._suppressed:
            kw["suppressed"] = self._suppressed
            self._suppressed = 0
        self._log.warning(event, **kw)
