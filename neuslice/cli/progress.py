"""Progress bars for passes over data (the CLI and the report): drawn only on a terminal."""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress"]


class Progress:
    """Re-iterable wrapper of ``data``: every pass draws a progress bar on ``stream`` (stderr) when it is a
    terminal and ``enabled``; otherwise it passes batches through untouched."""

    def __init__(self, data, desc: str, enabled: bool = True, stream=None):
        self.data, self.desc, self.enabled, self.stream = data, desc, enabled, stream

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        stream = self.stream if self.stream is not None else sys.stderr
        if not (self.enabled and stream.isatty()):
            yield from self.data
            return
        total = len(self.data) if hasattr(self.data, "__len__") else None
        t0 = time.perf_counter()
        i = 0
        for i, batch in enumerate(self.data, 1):
            yield batch
            self._draw(stream, i, total, time.perf_counter() - t0)
        stream.write("\n")
        stream.flush()

    def _draw(self, stream, i: int, total: Optional[int], secs: float) -> None:
        if total:
            done = int(24 * i / total)
            bar = f"[{'#' * done}{'.' * (24 - done)}] {i}/{total}"
        else:
            bar = f"{i} batches"
        stream.write(f"\r{self.desc:<14} {bar} {secs:5.1f}s")
        stream.flush()
