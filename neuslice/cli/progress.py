"""Progress bars for passes over data (the CLI and the report): drawn only on a terminal."""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress", "TrainProgress"]


class Progress:
    """Re-iterable wrapper of ``data``: every pass draws a progress bar on ``stream`` (stderr) when it is a
    terminal and ``enabled``; otherwise it passes batches through untouched."""

    def __init__(self, data, desc: str, enabled: bool = True, stream=None):
        self.data, self.desc, self.enabled, self.stream = data, desc, enabled, stream

    def __len__(self) -> int:
        return len(self.data)

    def _stream(self):
        return self.stream if self.stream is not None else sys.stderr

    def _shown(self) -> bool:
        return self.enabled and self._stream().isatty()

    def label(self) -> str:
        """What the bar drawn now is labelled."""
        return self.desc

    def __iter__(self):
        stream = self._stream()
        if not self._shown():
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
        stream.write(f"\r{self.label():<14} {bar} {secs:5.1f}s")
        stream.flush()


class TrainProgress(Progress):
    """The bar of a maintenance operator's training data. Used as a context manager around the operator, it
    receives every training step (:func:`neuslice.maintain.on_train_step`) and labels each pass by what it is:
    ``DESC epoch 2/3 loss 0.4213`` while training; ``check labels`` for the operator's label check before
    training; ``DESC (reading)`` for any other pass. Training on data it does not wrap (incremental with
    replay trains on a mix) draws a bar of its own per epoch."""

    def __init__(self, data, desc: str, enabled: bool = True, stream=None):
        super().__init__(data, desc, enabled, stream)
        self.last = None            # the latest TrainStep
        self.steps = 0              # steps seen
        self._pass_start = None     # self.steps when the pass being drawn began (None: no pass running)
        self._own = None            # (epoch, start time) of a bar drawn from steps alone
        self._passes = 0            # passes begun over data
        self._ctx = None

    def label(self) -> str:
        s = self.last
        if self._pass_start is None or self.steps > self._pass_start:
            return f"{self.desc} epoch {s.epoch}/{s.epochs} loss {s.loss:.4f}"
        return "check labels" if self.steps == 0 and self._passes == 1 else f"{self.desc} (reading)"

    def __iter__(self):
        self._passes += 1
        self._pass_start = self.steps
        try:
            yield from super().__iter__()
        finally:
            self._pass_start = None

    def on_step(self, step) -> None:
        self.last, self.steps = step, self.steps + 1
        if self._pass_start is not None or not self._shown():
            return
        stream, now = self._stream(), time.perf_counter()
        if self._own is None or self._own[0] != step.epoch:
            if self._own is not None:
                stream.write("\n")
            self._own = (step.epoch, now)
        self._draw(stream, step.step, step.steps, now - self._own[1])

    def __enter__(self) -> "TrainProgress":
        from ..maintain import on_train_step
        self._ctx = on_train_step(self.on_step)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        if self._own is not None and self._shown():
            self._stream().write("\n")
            self._stream().flush()
        self._own = None
