"""Model maintenance enabled by slicing (SPEC §6): restructure, re-adapt, incremental development, compress.

- :func:`restructure` → :class:`RestructuredModel` (mask or physical), :func:`finetune` it;
- :func:`compress`: magnitude pruning (global, uniform+, erk, lamp) in prune → fine-tune iterations;
- :func:`readapt`: critical-neuron tuning on new samples;
- :func:`incremental` → :class:`TaskAwareModel`: new classes learnt in non-critical neurons.
"""
from __future__ import annotations

from ._common import evaluate
from .compress import METHODS, CompressReport, compress
from .incremental import IncrementalReport, TaskAwareModel, incremental
from .readapt import ReadaptReport, readapt
from .restructure import RestructuredModel, finetune, restructure

__all__ = ["RestructuredModel", "restructure", "finetune", "compress", "CompressReport", "METHODS", "readapt",
           "ReadaptReport", "incremental", "IncrementalReport", "TaskAwareModel", "evaluate"]
