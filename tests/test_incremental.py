"""incremental: new classes in non-critical neurons, task-aware inference (docs/method.md §6)."""
import pytest
import torch
from torch import nn

import neuslice
from neuslice.maintain import TaskAwareModel, incremental
from neuslice.maintain.incremental import free_weight_masks

from maintain_fixtures import assert_unchanged, loader, slices, snapshot, tensors, trained

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def _masked_logits(model, s, x):
    with s.apply(model, list(A)) as m, torch.no_grad():
        return m(x)[:, list(A)]


@pytest.mark.parametrize("arch", ["digits_cnn", "digits_resnet", "digits_separable", "digits_transformer"])
def test_task_a_is_bit_identical_and_frozen_weights_do_not_move(arch):
    model = trained(arch, classes=A)
    s = slices(arch, classes=A, theta=0.7)
    before = snapshot(model)
    x, _ = tensors("test", n=120)
    want = _masked_logits(model, s, x)
    out, rep = incremental(model, s, loader("train", B, n=200, batch_size=32), new_classes=B, epochs=2, lr=1e-2,
                           eval_data=loader("test", A), new_eval_data=loader("test", B))
    assert_unchanged(model, before)
    assert isinstance(out, TaskAwareModel) and not out.training
    with torch.no_grad():
        got = out(x, task="A")
    assert torch.equal(got, want)
    masks, frozen_norms, frozen = free_weight_masks("t", model, s, list(A), list(B))
    new_params = dict(out.module.named_parameters())
    moved = 0
    for name, p in model.named_parameters():
        m = masks.get(name, torch.zeros(p.shape, dtype=torch.bool))
        m = m.view(-1, *([1] * (p.dim() - 1))).expand(p.shape) if m.shape != p.shape else m
        assert torch.equal(new_params[name][~m], p[~m]), f"frozen entries of {name} moved"
        moved += int((new_params[name] != p).sum())
    assert moved > 0
    new_mods = dict(out.module.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            f = frozen_norms.get(mod, torch.ones(mod.num_features, dtype=torch.bool))
            assert torch.equal(new_mods[name].running_mean[f], mod.running_mean[f])
            assert torch.equal(new_mods[name].running_var[f], mod.running_var[f])
    assert rep.task_b_acc_after > rep.task_b_acc_before + 0.1
    assert rep.task_a_acc_after == neuslice.maintain.evaluate(lambda v: out.predict(v, task="A"), loader("test", A))
    assert rep.old_classes == list(A) and rep.new_classes == list(B) and rep.theta == 0.7
    assert 0 < rep.free_fraction < 1 and rep.steps == 2 * 7


def test_warns_when_no_free_neuron_feeds_the_head_under_the_joint_objective():
    # The configuration that collapsed task B to chance on digits: free neurons early, none in the layer
    # that feeds the head. Built here by marking every neuron of the last conv critical.
    import copy
    import warnings
    model = trained("digits_cnn", classes=A)
    s = copy.deepcopy(slices("digits_cnn", classes=A, theta=0.7))
    s.critical_sets["features.4"][:] = True
    data = loader("train", B, n=64, batch_size=32)
    with pytest.warns(UserWarning, match=r"no free neuron in 'features.4' \(the layer\(s\) feeding the head 'head'\)") \
            as caught:
        _, rep = incremental(model, s, data, new_classes=B, epochs=1, lr=1e-2, objective="joint")
    assert [w.filename for w in caught if "no free neuron" in str(w.message)] == [__file__]   # points at the caller
    assert rep.free_by_layer["features.4"] == 0 and rep.free_by_layer["features.0"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the task objective, or free neurons feeding the head: no warning
        incremental(model, s, data, new_classes=B, epochs=1, lr=1e-2, objective="task")
        _, rep = incremental(model, slices("digits_cnn", classes=A, theta=0.7), data, new_classes=B, epochs=1,
                             lr=1e-2, objective="joint")
    assert rep.free_by_layer["features.4"] > 0


def test_weight_rule_out_or_in_free():
    """Independent check of the rule on the CNN: conv W[o, i] and head W[k, c·S + s] masks."""
    model = trained("digits_cnn", classes=A)
    s = slices("digits_cnn", classes=A, theta=0.7)
    masks, _, frozen = free_weight_masks("t", model, s, list(A), list(B))
    f0, f1 = ~frozen["features.0"], ~frozen["features.4"]
    w = masks["features.4.weight"]
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            assert bool(w[o, i].all()) == bool(f1[o] or f0[i]) and bool(w[o, i].any()) == bool(w[o, i].all())
    assert torch.equal(masks["features.0.weight"][:, 0, 0, 0], f0)
    h = masks["head.weight"]
    cols = h.shape[1] // f1.numel()
    for k in range(10):
        for c in range(h.shape[1]):
            assert bool(h[k, c]) == (k in B or bool(f1[c // cols]))
    assert torch.equal(masks["head.bias"], torch.tensor([k in B for k in range(10)]))
    assert torch.equal(masks["features.1.weight"], f0)


def test_task_aware_outputs_and_replay():
    model = trained("digits_mlp", classes=A)
    s = slices("digits_mlp", classes=A, theta=0.7)
    x, _ = tensors("test", n=30)
    out, rep = incremental(model, s, loader("train", B, n=100, batch_size=25), new_classes=[9, 5, 6, 7, 8],
                           replay=0.1, replay_data=loader("train", A, n=200), epochs=1, lr=1e-2,
                           task_names=("old", "new"), objective="joint", optimizer="sgd")
    assert rep.replayed == 20 and rep.steps == 5 and rep.new_classes == list(B)
    with torch.no_grad():
        assert out(x).shape == (30, 10) and out(x, task="old").shape == (30, 5) and out(x, task="new").shape == (30, 5)
        assert set(out.predict(x, task="new").tolist()) <= set(B)
        assert set(out.predict(x, task="old").tolist()) <= set(A)
        assert torch.equal(out(x, task="old"), _masked_logits(model, s, x))
    with pytest.raises(ValueError, match=r"neuslice.TaskAwareModel: unknown task 'A'; expected one of \['old', 'new'\]"):
        out(x, task="A")


def test_errors_name_the_function_and_change_nothing():
    model = trained("digits_cnn", classes=A)
    s = slices("digits_cnn", classes=A)
    before = snapshot(model)
    data_b = loader("train", B, n=40)
    with pytest.raises(ValueError, match=r"neuslice.incremental: new_classes \[4, 5\] overlap the old classes "
                                         r"\[0, 1, 2, 3, 4\] in \[4\]"):
        incremental(model, s, data_b, new_classes=[4, 5])
    with pytest.raises(ValueError, match="neuslice.incremental: new_classes must name at least one class, got none"):
        incremental(model, s, data_b, new_classes=[])
    with pytest.raises(ValueError, match=r"neuslice.incremental: new_classes must be ints in \[0, 10\)"):
        incremental(model, s, data_b, new_classes=[5, 10])
    with pytest.raises(ValueError, match=r"neuslice.incremental: data has label 9, outside the declared classes "
                                         r"\[5, 6, 7, 8\]"):
        incremental(model, s, data_b, new_classes=[5, 6, 7, 8])
    with pytest.raises(ValueError, match="neuslice.incremental: replay=0.1 needs replay_data"):
        incremental(model, s, data_b, new_classes=B, replay=0.1)
    with pytest.raises(ValueError, match=r"neuslice.incremental: replay must be a fraction in \(0, 1\]"):
        incremental(model, s, data_b, new_classes=B, replay=1.5, replay_data=loader("train", A, n=40))
    with pytest.raises(ValueError, match=r"neuslice.incremental: replay_data has label 5, outside the declared "
                                         r"classes \[0, 1, 2, 3, 4\]"):
        incremental(model, s, data_b, new_classes=B, replay=0.5, replay_data=loader("train", (0, 5), n=40))
    with pytest.raises(ValueError, match="neuslice.incremental: objective must be 'task' or 'joint', got 'all'"):
        incremental(model, s, data_b, new_classes=B, objective="all")
    with pytest.raises(ValueError, match=r"neuslice.incremental: task_names must be two distinct strings, got \('A', 'A'\)"):
        incremental(model, s, data_b, new_classes=B, task_names=("A", "A"))
    with pytest.raises(neuslice.SignatureError, match="neuslice.incremental: the file was made for another model"):
        incremental(trained("digits_mlp", classes=A), s, data_b, new_classes=B)
    with pytest.raises(ValueError, match=r"neuslice.incremental: class 7 \('7'\) has no critical set"):
        incremental(model, s, data_b, new_classes=[8, 9], old_classes=[0, 7])
    assert_unchanged(model, before)
