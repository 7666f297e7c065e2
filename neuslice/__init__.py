"""neuslice: neuron-level semantic slicing of deep neural networks (NeuSemSlice) and the model
maintenance it enables, on fused Triton, CUDA and C++ kernels behind one dispatch point."""
from __future__ import annotations

import torch  # noqa: F401  (first: its OpenMP runtime serves neuslice._C too)

from . import ops
from ._errors import BackendError, NeusliceError, NonFiniteError
from ._info import backend_info

__version__ = "0.1.0"
__all__ = ["ops", "backend_info", "NeusliceError", "NonFiniteError", "BackendError", "__version__"]
