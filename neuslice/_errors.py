"""Exceptions of neuslice. All derive from the builtin a caller would catch anyway."""


class NeusliceError(Exception):
    """Base of every neuslice-specific error."""


class NonFiniteError(NeusliceError, ValueError):
    """A batch held a non-finite activation or gradient; no statistic was changed."""


class BadLabelError(NeusliceError, ValueError):
    """A kernel found a label outside [0, K) that is not ignore_index; no statistic was changed. The
    front door answers it with its own check's error, which names the label (neuslice.ops)."""


class BackendError(NeusliceError, RuntimeError):
    """A forced backend cannot run this call; the message lists every backend and why."""


# Kernel status bits, as csrc/include/neuslice/common.h defines them (the Triton kernels use the same).
STATUS_NONFINITE_X, STATUS_NONFINITE_G, STATUS_BAD_LABEL, STATUS_BAD_SCORE = 1, 2, 4, 8


# The findings of accumulate_'s data errors, worded alike by every backend (and read back by status_of).
NONFINITE_X = "non-finite value in x"
NONFINITE_G = "non-finite value in grad (or in x*grad)"


def raise_for_status(op: str, status: int, backend: str, *, num_classes: int = 0) -> None:
    """Turn a kernel's status word into the op's error (nothing was changed when it is nonzero)."""
    if status == 0:
        return
    if status & STATUS_BAD_LABEL:
        raise BadLabelError(f"neuslice.{op}: labels must lie in [0, {num_classes}); no statistic was changed")
    if status & STATUS_NONFINITE_X:
        raise NonFiniteError(f"neuslice.{op}: {NONFINITE_X}; no statistic was changed")
    if status & STATUS_NONFINITE_G:
        raise NonFiniteError(f"neuslice.{op}: {NONFINITE_G}; no statistic was changed")
    if status & STATUS_BAD_SCORE:
        raise ValueError(f"neuslice.{op}: scores must be finite and non-negative")
    raise RuntimeError(f"neuslice.{op}: {backend} kernel failed with status {status}")


def status_of(e: Exception) -> int:
    """The status bits of an accumulate_ data error (BadLabelError, or a NonFiniteError worded as above)."""
    if isinstance(e, BadLabelError):
        return STATUS_BAD_LABEL
    if isinstance(e, NonFiniteError):
        return STATUS_NONFINITE_X if f": {NONFINITE_X};" in str(e) else STATUS_NONFINITE_G
    raise TypeError(f"not an accumulate_ data error: {type(e).__name__}: {e}")
