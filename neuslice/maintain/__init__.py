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

:func:`on_train_step` installs a callback that every operator's training loop calls after each step with a
:class:`TrainStep` (epoch, step, loss), e.g. for a progress display.
"""
from __future__ import annotations

from ._common import TrainStep, evaluate, on_train_step
from .compress import METHODS, CompressReport, compress
from .incremental import IncrementalReport, TaskAwareModel, incremental
from .readapt import ReadaptReport, readapt
from .restructure import FinetuneReport, RestructuredModel, RestructureReport, finetune, removable_layers, restructure

__all__ = ["RestructuredModel", "restructure", "RestructureReport", "finetune", "FinetuneReport", "compress",
           "CompressReport", "METHODS", "readapt", "ReadaptReport", "incremental", "IncrementalReport",
           "TaskAwareModel", "removable_layers", "evaluate", "TrainStep", "on_train_step"]
