"""A dependency-free progress bar for long benchmark runs (stderr; one line per step when not a TTY)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "attention") as bar: bar.step("b=8 s=2048 ...")``."""

    def __init__(self, total: int, title: str, stream=None, width: int = 30):
        self.total, self.title, self.width = max(total, 1), title, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self):
        return self

    def step(self, label: str) -> None:
        self.done += 1
        frac = self.done / self.total
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"{self.title} [{bar}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:6.1f}s  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def __exit__(self, *exc):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return False
