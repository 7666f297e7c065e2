"""neuslice: neuron-level semantic slicing of deep neural networks (NeuSemSlice), and the model
maintenance it enables, on fused Triton, CUDA and C++ kernels behind one dispatch point.

Slicing in three steps::

    prof = neuslice.profile(model, loader, num_classes=10)          # docs/method.md §2: one pass, additive sums
    slices = neuslice.semantic_slice(prof, "taylor", theta=0.95)     # docs/method.md §4
    with slices.apply(model, classes=[3, 5]):                        # evaluate the masked model
        ...
"""
from __future__ import annotations

import torch  # noqa: F401  (first: its OpenMP runtime serves neuslice._C too)

from . import ops
from ._errors import BackendError, NeusliceError, NonFiniteError
from .ops._info import backend_info
from .io.container import FileFormatError, SignatureError
from .engine.profiler import Profiler
from . import maintain
from .maintain import RestructuredModel, TaskAwareModel, compress, finetune, incremental, readapt, removable_layers, restructure
from .engine.metrics import METRICS
from .engine.profile import profile
from .engine.slices import Profile, Slices
from .engine.slicing import category_slice, global_slice, semantic_slice
from .engine.compat import conv1d_to_linear

from ._version import __version__
__all__ = ["ops", "backend_info", "NeusliceError", "NonFiniteError", "BackendError", "FileFormatError",
           "SignatureError", "profile", "Profiler", "Profile", "Slices", "METRICS", "global_slice",
           "category_slice", "semantic_slice", "maintain", "restructure", "removable_layers", "finetune", "compress", "readapt",
           "incremental", "RestructuredModel", "TaskAwareModel", "conv1d_to_linear", "__version__"]
