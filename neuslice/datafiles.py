"""Deprecated path: data files moved to :mod:`neuslice.io.data`, model files to :mod:`neuslice.io.modelfile`."""
import warnings

from .io.data import DataFileError, Dataset, load_data, parse_classes, read_idx  # noqa: F401
from .io.modelfile import build_model, load_model, read_weights, resolve_factory, save_model  # noqa: F401

warnings.warn("neuslice.datafiles is deprecated: import from neuslice.io.data and neuslice.io.modelfile",
              DeprecationWarning, stacklevel=2)
__all__ = ["DataFileError", "Dataset", "load_data", "parse_classes", "read_idx", "build_model", "load_model",
           "read_weights", "resolve_factory", "save_model"]
