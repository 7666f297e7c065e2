"""Model maintenance enabled by slicing (see docs/method.md): restructure, re-adapt, incremental development,
compress.

Every operator returns ``(model, report)`` (the report a dataclass with ``as_dict()``) and names its arguments
alike: ``data`` (training batches), ``eval_data`` (held-out data of the task the input model serves),
``new_eval_data`` (held-out data of what it is taught: readapt, incremental), ``epochs``, ``lr``, ``optimizer``,
``momentum``, ``weight_decay``, ``seed``.

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
from .restructure import FinetuneReport, RestructuredModel, RestructureReport, finetune, restructure

__all__ = ["RestructuredModel", "restructure", "RestructureReport", "finetune", "FinetuneReport", "compress",
           "CompressReport", "METHODS", "readapt", "ReadaptReport", "incremental", "IncrementalReport",
           "TaskAwareModel", "evaluate"]
