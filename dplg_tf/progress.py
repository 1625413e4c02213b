"""A small progress bar for long jobs: count, rate, ETA, on stderr.

On a terminal the line is redrawn in place; otherwise (logs, CI) a line is
printed at most every `log_every` seconds, so logs stay short.
"""

import sys
import time


def _clock(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total, unit="items", enabled=True, stream=None, log_every=10.0):
        self.total = int(total)
        self.unit = unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every if not self.tty else 0.2
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    @property
    def rate(self):
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self):
        width = 24
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        eta = (self.total - self.done) / self.rate if self.rate > 0 else 0
        return (f"[{bar}] {self.done}/{self.total} {self.unit} "
                f"{self.rate:.1f}/s ETA {_clock(eta)}")

    def update(self, n=1):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.log_every or self.done == self.total):
            self._last = now
            end = "\r" if self.tty else "\n"
            print(self.line(), end=end, file=self.stream, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)
