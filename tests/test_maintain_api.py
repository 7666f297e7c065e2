"""The maintenance operators' one shape: every operator returns ``(model, report)``, the same roles carry the
same names and defaults, and the keywords that moved still work for one release with a DeprecationWarning."""
import dataclasses
import inspect
import warnings

import pytest
import torch

import neuslice
from torch import nn

from neuslice.maintain import (CompressReport, FinetuneReport, IncrementalReport, ReadaptReport, RestructuredModel,
                               RestructureReport, TaskAwareModel, compress, evaluate, finetune, incremental, readapt,
                               restructure)
from neuslice.maintain._common import renamed_kwargs

from maintain_fixtures import loader, slices, tensors, trained

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = [2, 7]
A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
TRAINING = (finetune, compress, readapt, incremental)


def _is_report(rep, cls) -> None:
    assert isinstance(rep, cls) and dataclasses.is_dataclass(rep)
    d = rep.as_dict()
    assert isinstance(d, dict) and list(d) == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("mode", ["mask", "physical"])
def test_restructure_returns_the_model_and_a_report_of_it(mode):
    model = trained("digits_cnn")
    x, _ = tensors("test", n=2)
    out = restructure(model, slices("digits_cnn"), KEEP, mode=mode, example_inputs=x)
    assert isinstance(out, tuple) and len(out) == 2
    new, rep = out
    assert isinstance(new, RestructuredModel) and not new.training
    _is_report(rep, RestructureReport)
    total = sum(p.numel() for p in model.parameters())
    assert rep.mode == mode and rep.classes == KEEP == new.class_map.tolist() and rep.class_names == ["2", "7"]
    assert rep.original_params == total == new.original_params and rep.params == new.num_params
    assert rep.compression_rate == new.compression_rate and rep.kept == new.kept
    assert (rep.params == total and rep.compression_rate == 0.0) if mode == "mask" else rep.params < total


def test_finetune_returns_the_model_and_a_report():
    phys, _ = restructure(trained("digits_cnn"), slices("digits_cnn"), KEEP, example_inputs=tensors("test", n=2)[0])
    tr, te = loader("train", KEEP, n=64, batch_size=16), loader("test", KEEP)
    tuned, rep = finetune(phys, tr, epochs=2, lr=0.01, eval_data=te)
    _is_report(rep, FinetuneReport)
    assert isinstance(tuned, RestructuredModel) and not tuned.training
    assert rep.steps == 2 * len(tr)
    assert rep.accuracy_before == evaluate(phys.predict, te) and rep.accuracy_after == evaluate(tuned.predict, te)
    # eval_data only scores: the trained weights are those of a run without it, and the report says None
    plain, rep0 = finetune(phys, tr, epochs=2, lr=0.01)
    assert rep0.accuracy_before is None and rep0.accuracy_after is None and rep0.steps == rep.steps
    for p, q in zip(plain.parameters(), tuned.parameters()):
        assert torch.equal(p, q)


def test_every_training_operator_returns_the_model_and_a_report():
    model = trained("digits_cnn")
    s = slices("digits_cnn")
    data = loader("train", KEEP, n=40)
    out, rep = compress(model, data, 0.5, step=0.5, epochs=0)
    assert isinstance(out, nn.Module)
    _is_report(rep, CompressReport)
    out, rep = readapt(model, s, data, eval_data=loader("test", n=60))
    assert isinstance(out, nn.Module)
    _is_report(rep, ReadaptReport)
    model_a = trained("digits_cnn", classes=A)
    out, rep = incremental(model_a, slices("digits_cnn", classes=A, theta=0.7), loader("train", B, n=40),
                           new_classes=B)
    assert isinstance(out, TaskAwareModel)
    _is_report(rep, IncrementalReport)


def test_the_same_roles_have_the_same_names_and_defaults():
    shared = {"epochs": 1, "lr": 1e-3, "optimizer": "adamw", "momentum": 0.9, "weight_decay": 0.0,
              "eval_data": None, "seed": 0}
    for op in TRAINING:
        params = inspect.signature(op).parameters
        assert "data" in params and params["data"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, op.__name__
        got = {k: params[k].default for k in shared}
        assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in shared), op.__name__
        # compress fine-tunes with SGD at 0.01, readapt 10 epochs at 3e-3 (their docstrings say why)
        want = {**shared, "lr": 0.01, "optimizer": "sgd"} if op is compress else \
            {**shared, "epochs": 10, "lr": 3e-3} if op is readapt else shared
        assert got == want, op.__name__
    for op in (readapt, incremental):
        assert inspect.signature(op).parameters["new_eval_data"].default is None


def _incremental_run(**kw):
    model = trained("digits_cnn", classes=A)
    s = slices("digits_cnn", classes=A, theta=0.7)
    return incremental(model, s, new_classes=B, epochs=1, lr=1e-2, **kw)


def test_incremental_old_keywords_still_work_and_warn():
    args = dict(data=loader("train", B, n=60, batch_size=20), eval_data=loader("test", A, n=80),
                new_eval_data=loader("test", B, n=80))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)     # the new names: no warning
        new, rep = _incremental_run(**args)
    old_names = {"data": "data_b", "eval_data": "eval_a", "new_eval_data": "eval_b"}
    with pytest.warns(DeprecationWarning) as caught:
        old, rep_old = _incremental_run(**{old_names[k]: v for k, v in args.items()})
    msgs = sorted(str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
    assert msgs == sorted(f"neuslice.incremental: the keyword {o!r} is deprecated and will be removed in the next "
                          f"release; use {n!r}" for n, o in old_names.items())
    assert all(w.filename == __file__ for w in caught if issubclass(w.category, DeprecationWarning))
    assert rep_old.as_dict() == rep.as_dict() and rep.task_a_acc_after is not None
    for p, q in zip(old.parameters(), new.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="neuslice.incremental: got both 'eval_a' \\(deprecated\\) and 'eval_data'"):
        _incremental_run(data=args["data"], eval_a=args["eval_data"], eval_data=args["eval_data"])


def test_renamed_kwargs_passes_other_arguments_through_and_keeps_the_signature():
    @renamed_kwargs("f", old="new")
    def f(a, *, new=0, other=1):
        """doc"""
        return a, new, other

    assert f(1, other=2) == (1, 0, 2) and f.__doc__ == "doc"
    assert list(inspect.signature(f).parameters) == ["a", "new", "other"]
    with pytest.warns(DeprecationWarning, match="f: the keyword 'old' is deprecated"):
        assert f(1, old=5) == (1, 5, 1)


def test_batches_move_to_the_models_device(monkeypatch):
    """Every forward of the operators and of the accuracy goes through call_model, which moves the batch to the
    model's device first (the CPU is the only device here, so the test observes the move, not a transfer)."""
    from neuslice.engine import calls
    from neuslice.engine.evaluate import accuracy
    moved = []
    real = calls.to_device
    monkeypatch.setattr(calls, "to_device", lambda x, device: moved.append(str(device)) or real(x, device))
    model, s = trained("digits_cnn"), slices("digits_cnn")
    data = loader("train", (3, 8), n=64)
    new, _ = neuslice.readapt(model, s, data, epochs=1, eval_data=data)
    batches = len(list(data))
    # readapt: before/after scoring of the new data and of eval_data (4 passes) + one training epoch
    assert moved.count("cpu") == len(moved) >= 5 * batches
    moved.clear()
    accuracy(new, data)
    accuracy(new, data, classes=[3, 8])
    assert moved == ["cpu"] * (2 * batches)
