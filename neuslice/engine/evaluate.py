"""Top-1 accuracy: the one scoring loop that every operator, report and command uses."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .capture import call_model

__all__ = ["accuracy", "restricted_predict"]

Predict = Callable[[object], torch.Tensor]


def restricted_predict(model: nn.Module, classes: Sequence[int]) -> Predict:
    """``x -> class id``: argmax of ``model(x)`` over the logits of ``classes`` only (int64 ``[B]``)."""
    cls = torch.as_tensor(sorted(set(int(c) for c in classes)))

    def predict(x):
        out = call_model(model, x)
        return cls.to(out.device)[out[..., cls.to(out.device)].argmax(-1)]
    return predict


@torch.no_grad()
def accuracy(model: Union[nn.Module, Predict], data: Iterable, classes: Optional[Sequence[int]] = None, *,
             who: str = "neuslice.accuracy") -> float:
    """Top-1 accuracy over ``data`` (``(inputs, labels [B])`` batches).

    ``model`` is an ``nn.Module`` (left in its mode; its prediction is the argmax of its logits, over
    ``classes``' logits only when ``classes`` is given: the model then serves exactly that class set) or a
    ``predict(inputs) -> int64 [B]`` callable. With ``classes``, only samples labelled in ``classes`` count.
    Raises, naming ``who``, when no sample counts.
    """
    if isinstance(model, nn.Module):
        net = model
        predict = (lambda x: call_model(net, x).argmax(-1)) if classes is None else restricted_predict(net, classes)
    else:
        predict = model
    correct = total = 0
    keep_cls = None if classes is None else torch.as_tensor(sorted(set(int(c) for c in classes)))
    for x, y in data:
        pred = predict(x).cpu()
        if keep_cls is not None:
            keep = torch.isin(y, keep_cls)
            pred, y = pred[keep], y[keep]
        correct += int((pred == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError(f"{who}: no sample in the loader" +
                         ("" if classes is None else f" has a label in {sorted(set(classes))}"))
    return correct / total
