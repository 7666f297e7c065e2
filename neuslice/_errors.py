"""Exceptions of neuslice. All derive from the builtin a caller would catch anyway."""


class NeusliceError(Exception):
    """Base of every neuslice-specific error."""


class NonFiniteError(NeusliceError, ValueError):
    """A batch held a non-finite activation or gradient; no statistic was changed."""


class BackendError(NeusliceError, RuntimeError):
    """A forced backend cannot run this call; the message lists every backend and why."""
