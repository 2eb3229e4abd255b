"""A progress bar on stderr: redrawn in place on a terminal, a few plain lines in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, note: str = "") -> None:
        self.done += 1
        if self.tty:
            # Redrawing on every request of a fast arm would cost more than the request.
            if self.done == self.total or time.monotonic() - self._last_draw >= 0.1:
                self._draw_bar(note)
        else:
            # A log gets one line per tenth of the work, never one per request.
            decile = 10 * self.done // max(self.total, 1)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {self.done}/{self.total} ({self._elapsed()})\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw_bar("")
            self.stream.write("\n")
            self.stream.flush()

    def _draw_bar(self, note: str) -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {self._elapsed()} {note[:30]:<30}")
        self.stream.flush()
        self._last_draw = time.monotonic()

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.0f} s"
