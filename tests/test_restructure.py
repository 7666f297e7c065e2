"""restructure (mask / physical), finetune: docs/method.md §6 'Restructure'."""
import copy

import pytest
import torch
from torch import nn

import neuslice
from neuslice.maintain import RestructuredModel, finetune, restructure
from neuslice.models import accuracy

from maintain_fixtures import ARCHS, assert_unchanged, ffn_layers, loader, slices, snapshot, tensors, trained

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = [2, 7]


@pytest.mark.parametrize("arch", ARCHS)
def test_physical_agrees_with_mask_and_has_the_predicted_size(arch):
    model = trained(arch)
    s = slices(arch)
    before = snapshot(model)
    x, _ = tensors("test", n=96)
    mask, _ = restructure(model, s, KEEP, mode="mask")
    phys, _ = restructure(model, s, KEEP, example_inputs=x[:2])
    assert_unchanged(model, before)
    assert isinstance(phys, RestructuredModel) and phys.mode == "physical" and not phys.training
    with torch.no_grad():
        ym, yp = mask(x), phys(x)
    assert ym.shape == yp.shape == (96, 2) and ym.dtype == yp.dtype == torch.float32
    torch.testing.assert_close(yp, ym, rtol=1e-4, atol=1e-5)
    total = sum(p.numel() for p in model.parameters())
    predicted = total - round(s.compression_rate(model, KEEP) * total)
    assert phys.num_params == predicted < total
    assert phys.class_map.tolist() == KEEP and phys.class_names == ["2", "7"]
    kept = s.mask(KEEP)
    assert phys.kept == {n: int(k.sum()) for n, k in kept.items()}
    assert set(phys.predict(x).tolist()) <= set(KEEP)


def test_mask_mode_is_slices_apply_with_the_logits_restricted():
    model = trained("digits_resnet")
    s = slices("digits_resnet")
    x, _ = tensors("test", n=50)
    m, _ = restructure(model, s, ["7", 3], mode="mask")     # names and indices; sorted class map
    assert m.class_map.tolist() == [3, 7] and m.compression_rate == 0.0
    with s.apply(model, [3, 7]) as masked, torch.no_grad():
        want = masked(x)[:, [3, 7]]
    with torch.no_grad():
        got = m(x)
        copied = copy.deepcopy(m)(x)
    assert torch.equal(got, want) and torch.equal(copied, got)
    assert sum(len(mod._forward_hooks) for mod in m.modules()) == 0


def test_class_map_predict_and_targets():
    model = trained("digits_cnn")
    s = slices("digits_cnn")
    x, y = tensors("test", (2, 7), n=40)
    phys, _ = restructure(model, s, KEEP, example_inputs=x[:2])
    assert torch.equal(phys.targets(torch.tensor([7, 2, 7])), torch.tensor([1, 0, 1]))
    with torch.no_grad():
        assert torch.equal(phys.predict(x), torch.tensor(KEEP)[phys(x).argmax(1)])
    assert (phys.predict(x) == y).float().mean() > 0.8
    with pytest.raises(ValueError, match=r"RestructuredModel.targets: label 5 is not one of the kept classes \[2, 7\]"):
        phys.targets(torch.tensor([2, 5]))


def test_physical_model_is_faster_to_store_and_runs_alone():
    model = trained("digits_separable")
    s = slices("digits_separable", theta=0.8)
    x, _ = tensors("test", n=8)
    phys, _ = restructure(model, s, [0], example_inputs=x[:2])
    clone = copy.deepcopy(phys.module)
    with torch.no_grad():
        assert torch.equal(clone(x), phys(x))
    assert phys.compression_rate > 0.3


def test_finetune_trains_a_copy_on_the_kept_classes():
    model = trained("digits_cnn")
    s = slices("digits_cnn")
    x, _ = tensors("test", n=4)
    phys, _ = restructure(model, s, KEEP, example_inputs=x[:2])
    before = snapshot(phys)
    tr, te = loader("train", KEEP, shuffle=True), loader("test", KEEP)
    acc0 = accuracy(phys, [(a, phys.targets(b)) for a, b in te])
    tuned, _ = finetune(phys, tr, epochs=1, lr=0.01)
    assert_unchanged(phys, before)
    acc1 = accuracy(tuned, [(a, tuned.targets(b)) for a, b in te])
    assert not tuned.training and acc1 >= acc0 - 0.02 and acc1 > 0.9
    with pytest.raises(ValueError, match=r"neuslice.finetune: data has label 3, outside the declared classes \[2, 7\]"):
        finetune(phys, loader("test", [2, 3]))
    with pytest.raises(TypeError, match="neuslice.finetune: model must be a RestructuredModel"):
        finetune(model, tr)


def test_errors_name_the_function_and_change_nothing(tmp_path):
    model = trained("digits_cnn")
    s = slices("digits_cnn")
    before = snapshot(model)
    x, _ = tensors("test", n=4)
    with pytest.raises(ValueError, match=r"neuslice.restructure: class 12 is outside \[0, 10\)"):
        restructure(model, s, [2, 12], example_inputs=x)
    with pytest.raises(ValueError, match=r"neuslice.restructure: unknown class name 'cat'"):
        restructure(model, s, ["cat"], example_inputs=x)
    with pytest.raises(ValueError, match="neuslice.restructure: expected at least one class, got none"):
        restructure(model, s, [], example_inputs=x)
    with pytest.raises(ValueError, match="neuslice.restructure: mode must be 'mask' or 'physical', got 'prune'"):
        restructure(model, s, KEEP, mode="prune")
    with pytest.raises(ValueError, match="neuslice.restructure: physical mode needs example_inputs"):
        restructure(model, s, KEEP)
    s.save(tmp_path / "cnn.slices")
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.restructure: .*layer 'features.0'"):
        restructure(trained("digits_mlp"), neuslice.Slices.load(tmp_path / "cnn.slices"), KEEP, example_inputs=x)
    wider = trained("digits_resnet")
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.restructure: the file was made for another model"):
        restructure(wider, s, KEEP, mode="mask")
    with pytest.raises(TypeError, match="neuslice.restructure: slices must be a neuslice.Slices, got dict"):
        restructure(model, {}, KEEP)
    assert_unchanged(model, before)


def test_partial_slices_refuse_class_without_critical_set():
    s = slices("digits_cnn", classes=(0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"neuslice.restructure: class 7 \('7'\) has no critical set"):
        restructure(trained("digits_cnn", classes=(0, 1, 2, 3, 4)), s, [1, 7], mode="mask")


def test_a_layer_the_dependency_graph_cannot_handle_is_named():
    model = trained("digits_transformer")
    x, _ = tensors("test", n=60)
    prof = neuslice.profile(model, loader("test", n=60), 10, progress=False)   # embed, ffn1, ffn2 all sliced
    s = neuslice.semantic_slice(prof, "taylor", 0.8)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"neuslice.restructure: cannot remove the neurons of layer 'embed' "
                                         r"physically: its outputs feed the residual add in the model's forward "
                                         r"before LayerNorm-like module 'blocks.0.ln1' \(LayerNorm\).*"
                                         r"layers=neuslice.removable_layers"):
        restructure(model, s, KEEP, example_inputs=x[:2])
    assert_unchanged(model, before)
    ok = neuslice.semantic_slice(neuslice.profile(model, loader("test", n=60), 10, layers=ffn_layers,
                                                  progress=False), "taylor", 0.8)
    assert restructure(model, ok, KEEP, example_inputs=x[:2])[0].num_params < sum(p.numel() for p in model.parameters())


def test_a_coupled_layer_left_out_of_the_slices_is_named():
    model = trained("digits_resnet")
    prof = neuslice.profile(model, loader("test", n=60), 10, progress=False,
                            layers=lambda n, m: isinstance(m, nn.Conv2d) and n != "blocks.0.conv2")
    s = neuslice.semantic_slice(prof, "taylor", 0.7)
    x, _ = tensors("test", n=4)
    with pytest.raises(ValueError, match=r"layer 'stem.0' physically: they reach Conv2d 'blocks.0.conv2' .*"
                                         r"not among the sliced layers"):
        restructure(model, s, KEEP, example_inputs=x[:2])
    assert restructure(model, s, KEEP, mode="mask")[0](x).shape == (4, 2)


@pytest.mark.parametrize("arch", ["digits_cnn", "digits_resnet", "digits_separable"])
def test_removable_layers_are_those_physical_restructure_cuts(arch):
    """What removable_layers offers, profiled and sliced, restructures physically (equal to mask mode, exactly
    the predicted parameters removed); ResNet's residual convs count (sliced together with their coupled group)."""
    model = trained(arch)
    x, _ = tensors("test", n=8)
    names = neuslice.removable_layers(model, x[:2])
    assert names
    s = neuslice.semantic_slice(neuslice.profile(model, loader("test", n=120), 10, layers=names, progress=False),
                                "taylor", 0.7)
    phys, _ = restructure(model, s, KEEP, example_inputs=x[:2])
    masked, _ = restructure(model, s, KEEP, mode="mask")
    with torch.no_grad():
        assert torch.allclose(phys(x), masked(x), rtol=1e-4, atol=1e-5)
    total = sum(p.numel() for p in model.parameters())
    assert round(s.compression_rate(model, KEEP) * total) == total - phys.num_params
