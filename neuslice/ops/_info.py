"""backend_info(): what this installation can run, and why not where it cannot."""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from . import _dispatch


def backend_info() -> Dict[str, Any]:
    """A dict describing the built extension, Triton, the device, and each backend's availability.

    Keys: ``c_extension`` (bool), ``c_extension_error`` (str or None), ``cuda_compiled`` (bool: CUDA
    kernels are in ``_C``), ``cuda_runtime_version`` (int or None), ``openmp_threads``, ``cpu_isa`` (the
    CPU kernels' instruction-set build in use: avx512, avx2 or base; ``NEUSLICE_CPU_ISA`` caps it), ``torch_threads``,
    ``triton`` (version or None), ``triton_error``, ``cuda_available`` (torch sees a GPU),
    ``forced`` (``NEUSLICE_BACKEND`` or None), ``order`` (per device type), ``backends``
    (name -> None if importable, else why not).
    """
    info: Dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        from .. import _C
        info.update(c_extension=True, c_extension_error=None, cuda_compiled=bool(_C.cuda_compiled),
                    openmp_threads=_C.openmp_max_threads(), cpu_isa=_C.cpu_isa(),
                    cuda_runtime_version=_C.cuda_runtime_version() if _C.cuda_compiled else None)
    except ImportError as e:
        info.update(c_extension=False, c_extension_error=f"{type(e).__name__}: {e}", cuda_compiled=False,
                    openmp_threads=None, cpu_isa=None, cuda_runtime_version=None)
    try:
        import triton
        info.update(triton=triton.__version__, triton_error=None)
    except Exception as e:
        info.update(triton=None, triton_error=f"{type(e).__name__}: {e}")
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    info["cuda_available"] = torch.cuda.is_available()
    info["forced"] = os.environ.get(_dispatch.ENV) or None
    info["order"] = {k: list(v) for k, v in _dispatch.ORDER.items()}
    info["order_by_op"] = {f"{op} on {dev}": list(v) for (op, dev), v in _dispatch.ORDER_BY_OP.items()}
    info["backends"] = {name: _dispatch.import_error(name) for name in _dispatch.backends()}
    return info
