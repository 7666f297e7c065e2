"""Deprecated path: the embedded digits data moved to :mod:`neuslice.io.digits`."""
import warnings

from .io.digits import DIGITS_CLASSES, digits_loaders, load_digits, subset_classes  # noqa: F401

warnings.warn("neuslice.data is deprecated: import from neuslice.io.digits", DeprecationWarning, stacklevel=2)
__all__ = ["DIGITS_CLASSES", "load_digits", "digits_loaders", "subset_classes"]
