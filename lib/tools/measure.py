"""Measuring a running computation: resident memory sampled in a background thread.

Used by the benchmark (this process, during one infer) and the load test (the server's
process and its children, during the load).
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

import psutil


class MemorySampler:
    """Resident set size (MB) of process ``pid`` (with its children when ``children``),
    sampled every ``interval`` seconds while the context is open, and once on entry and exit.

    ``pid`` None: nothing is sampled (for a process that could not be found);
    :attr:`peak_mb` is then 0 and :meth:`report` None.
    """

    def __init__(self, pid: Optional[int], children: bool = True, interval: float = 0.2):
        self.pid, self.children, self.interval = pid, children, interval
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> Optional[float]:
        """The resident memory now, or None when the process is gone or cannot be read."""
        try:
            process = psutil.Process(self.pid)
            total = process.memory_info().rss
            for child in process.children(recursive=True) if self.children else ():
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass  # a child that ended between the listing and the reading
            return total / 2**20
        except psutil.Error:
            return None

    def _sample(self) -> None:
        if (mb := self.rss_mb()) is not None:
            self.samples.append(mb)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        if self.pid is not None:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._sample()

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=0.0)

    def report(self) -> Optional[Dict[str, float]]:
        """``{pid, start_mb, peak_mb, end_mb}``, or None when nothing could be sampled."""
        if not self.samples:
            return None
        return {"pid": self.pid, "start_mb": round(self.samples[0], 1), "peak_mb": round(self.peak_mb, 1),
                "end_mb": round(self.samples[-1], 1)}
