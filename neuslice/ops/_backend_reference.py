"""The ``reference`` backend: plain torch on any device (see :mod:`neuslice.reference`)."""
from __future__ import annotations

from typing import Optional

from .reference import accumulate_, masked_adamw_, masked_sgd_, select, select_topk  # noqa: F401

__all__ = ["refuse", "accumulate_", "select", "select_topk", "masked_sgd_", "masked_adamw_"]


def refuse(op: str, args: tuple) -> Optional[str]:
    """The reference runs every call on every device."""
    return None
