"""The one class-spec parser: classes given as indices, names, or text such as ``"3,8"`` / ``"cat,dog"``."""
from __future__ import annotations

import numbers
from typing import Callable, Iterable, List, Optional, Sequence, Union

from torch import Tensor

__all__ = ["ClassSpec", "class_indices", "parse_class_list"]

ClassSpec = Union[int, str, Iterable[Union[int, str]]]


def class_indices(fn: str, class_names: Sequence[str], classes: ClassSpec,
                  unavailable: Optional[Callable[[int], str]] = None) -> List[int]:
    """``classes`` (an index, a class name, or an iterable of them) as sorted, distinct indices into
    ``class_names``. ``unavailable(k)`` says why class ``k`` cannot be used here (``""`` when it can).
    Raises ``TypeError``/``ValueError`` naming ``fn`` and what came."""
    items = [classes] if isinstance(classes, (int, str)) else list(classes)
    if not items:
        raise ValueError(f"{fn}: expected at least one class, got none")
    k_all = len(class_names)
    out = set()
    for c in items:
        if isinstance(c, str):
            if c not in class_names:
                raise ValueError(f"{fn}: unknown class name {c!r}; expected one of {list(class_names)}")
            c = list(class_names).index(c)
        integral = isinstance(c, numbers.Integral) or (isinstance(c, Tensor) and c.numel() == 1
                                                        and not c.is_floating_point())
        if isinstance(c, bool) or not integral:
            raise TypeError(f"{fn}: classes must be ints or class names, got {c!r}")
        c = int(c)
        if not 0 <= c < k_all:
            raise ValueError(f"{fn}: class {c} is outside [0, {k_all})")
        why = unavailable(c) if unavailable is not None else ""
        if why:
            raise ValueError(f"{fn}: class {c} ({class_names[c]!r}) {why}")
        out.add(c)
    return sorted(out)


def parse_class_list(fn: str, text: str, class_names: Sequence[str]) -> List[int]:
    """``"3,8"`` or ``"cat,dog"`` (comma-separated indices or names; a name wins over an index) as indices."""
    items: List[Union[int, str]] = []
    for item in (t.strip() for t in text.split(",")):
        if item in class_names:
            items.append(item)
        elif item.lstrip("-").isdigit():
            items.append(int(item))
        else:
            raise ValueError(f"{fn}: {item!r} is neither a class index nor one of the classes {list(class_names)}")
    return class_indices(fn, class_names, items)
