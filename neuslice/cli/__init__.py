"""The ``neuslice`` command (also ``python -m neuslice``).

Models: ``--model package.module:factory`` (or a built-in name) and ``--weights`` (safetensors or a
``torch.save``'d state dict, read with ``weights_only=True``). Data: see :mod:`neuslice.io.data`.
Steps chain through files: ``profile`` (model + data → profile file), ``merge`` (profiles → one),
``slice`` (profile → slices file), ``restructure`` / ``readapt`` / ``incremental`` (model + slices + data →
model file), ``report`` (files → an HTML report), ``predict`` (model file + data → accuracy);
``demo`` runs the whole job on the embedded digits data.

Exit codes: 0 ok, 1 failure (bad files, errors of the run), 2 usage (every argument error). ``--json``
prints one JSON object (the result, or ``{"error", "exit_code"}``); ``--debug`` shows tracebacks;
``--trust-model-code`` lets a model file name its own factory (docs/method.md §5).
"""
from __future__ import annotations

from .common import UsageError
from .demo import DemoConfig, run_demo
from .main import build_parser, main
from .progress import Progress

__all__ = ["main", "build_parser", "Progress", "UsageError", "run_demo", "DemoConfig"]
