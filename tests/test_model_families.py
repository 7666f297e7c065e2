"""Model families beyond the core test architectures, built offline from tiny model-library configs (random
weights), where the plan once missed a coupling: explicit "same" padding before convolutions (MobileNetV2 ported
from TensorFlow: the layers reading a sliced layer sat behind an ``F.pad``, so ``compression_rate`` undercounted
what physical restructure removes), grouped convolutions (RegNet: refused by name, not a failed forward), and
BEiT's layer scale (γ ⊙ x before the residual add) with its relative position bias table kept beside the attention
(docs/method.md §1, §4 "Compression rate", §6)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import neuslice
from neuslice.engine import heads
from neuslice.engine.capture import call_model
from neuslice.engine.graph import discover
from helpers import physical_equals_mask

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
KEEP = [0, 1]


def images(n=3, b=6, size=32):
    g = torch.Generator().manual_seed(0)
    return [({"pixel_values": torch.randn(b, 3, size, size, generator=g)}, torch.arange(b) % K) for _ in range(n)]


def mobilenet_v2():
    torch.manual_seed(0)
    return transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_channels=3, num_labels=K)).eval()


def regnet():
    torch.manual_seed(0)
    return transformers.RegNetForImageClassification(transformers.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_channels=3, num_labels=K)).eval()


def beit():
    torch.manual_seed(0)
    return transformers.BeitForImageClassification(transformers.BeitConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        use_relative_position_bias=True, num_channels=3, num_labels=K)).eval()


def restructured(model, d, theta):
    names = neuslice.removable_layers(model, d[0][0])
    prof = neuslice.profile(model, d, K, layers=names, metrics=("taylor",), progress=False)
    s = neuslice.semantic_slice(prof, "taylor", theta)
    phys, left = physical_equals_mask(model, s, KEEP, d[0][0], d[1][0])
    return names, s, phys, left


def test_consumers_are_found_behind_a_same_padding():
    model, d = mobilenet_v2(), images()
    plan = {i.name: i for i in discover(model, run=lambda: call_model(model, d[0][0]), _probe=True).layers}
    reduce0, expand1 = "mobilenet_v2.layer.0.reduce_1x1.convolution", "mobilenet_v2.layer.1.expand_1x1.convolution"
    assert (expand1, 1) in plan[reduce0].consumers          # an F.pad of the spatial dims lies between them
    names, s, phys, _ = restructured(model, d, 0.7)
    assert expand1 in names                                  # coupled with its depthwise conv through the padding
    kept = int(s.mask(KEEP)[expand1].sum())
    assert dict(phys.module.named_modules())["mobilenet_v2.layer.1.conv_3x3.convolution"].out_channels == kept


def test_a_grouped_convolution_is_refused_by_name():
    model, d = regnet(), images()
    names = neuslice.removable_layers(model, d[0][0])
    grouped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
               and m.groups != m.in_channels]
    assert grouped and not set(grouped) & set(names)
    feeding = "regnet.encoder.stages.0.layers.0.layer.0.convolution"          # reads into the grouped conv
    assert feeding not in names
    prof = neuslice.profile(model, d, K, layers=[feeding], metrics=("taylor",), progress=False)
    s = neuslice.semantic_slice(prof, "taylor", 0.5)
    with pytest.raises(ValueError, match=r"cannot remove the neurons of layer '" + feeding.replace(".", r"\.") +
                       r"' physically: they reach grouped convolution '[\w.]+' \(\d+ groups\), which needs every "
                       r"group to keep as many channels as the others"):
        neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])
    restructured(model, d, 0.7)                              # the removable layers go physically


def test_layer_scale_keeps_the_residual_stream_and_the_table_beside_the_attention_goes_with_its_heads():
    model, d = beit(), images()
    plan = discover(model, run=lambda: call_model(model, d[0][0]), _probe=True)
    for r in ("beit.layers.0.attention.o_proj", "beit.layers.0.mlp.fc2", "beit.layers.1.mlp.fc2"):
        assert r in plan.residual and "LayerNorm-like module" in plan.residual[r]
    a = plan.attention[0]
    assert [(n, dim) for n, _, _, dim in heads.per_head_tensors(model, a)] == \
        [("beit.layers.0.relative_position_bias.relative_position_bias_table", 1)]
    names, s, phys, left = restructured(model, d, 0.3)
    mods = dict(phys.module.named_modules())
    for a, n in left.items():
        assert mods[a.module.rsplit(".", 1)[0] + ".relative_position_bias"].relative_position_bias_table.shape[1] == n
    assert sum(a.heads - n for a, n in left.items()) > 0


def test_a_nonlinearity_on_one_pixel_is_found_by_its_channels():
    """PoolFormer's last stage runs on 1×1 maps: its FFN activation (the model library's GELUActivation, found by
    evidence) is probed along the channels when the last dim has one element, so conv2 is known to read conv1."""
    torch.manual_seed(0)
    model = transformers.PoolFormerForImageClassification(transformers.PoolFormerConfig(
        hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_channels=3, num_labels=K)).eval()
    d = images()
    plan = {i.name: i for i in discover(model, run=lambda: call_model(model, d[0][0]), _probe=True).layers}
    last = "poolformer.encoder.block.3.0.output."
    assert plan[last + "conv1"].tap == last + "act_fn" and plan[last + "conv1"].consumers == [(last + "conv2", 1)]
    restructured(model, d, 0.7)


def test_mobilevit_patches_unfolded_into_the_batch_are_read_through_its_layernorms():
    """MobileViT's transformer runs on ``[B * patch_area, patches, C]``: each sample's pixels of one patch offset
    unfolded into the batch dim, sample-major, with a LayerNorm between the unfolding and q/k/v, and attention
    before the out projection. The probe follows the sample of each row through them (batched steps); the conv
    stages are not offered for physical removal in a model with attention blocks."""
    torch.manual_seed(0)
    model = transformers.MobileViTForImageClassification(transformers.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_channels=3,
        num_labels=K)).eval()
    d = images()
    att = "mobilevit.encoder.layer.2.transformer.layer.0.attention."
    plan = {i.name: i for i in discover(model, run=lambda: call_model(model, d[0][0]), _probe=True).layers}
    for name in (att + "attention.query", att + "output.dense"):
        assert (plan[name].fold, plan[name].fold_error, plan[name].fold_ordered) == (4, None, True)
    names = neuslice.removable_layers(model, d[0][0])
    assert att + "attention.query" in names and not [n for n in names if "conv" in n]
    prof = neuslice.profile(model, d, K, layers=[att + "attention.query"], metrics=("avg",), progress=False)
    got = []
    h = dict(model.named_modules())[att + "attention.query"].register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        for x, _ in d:
            call_model(model, x)
    h.remove()
    want = torch.zeros(K, got[0].shape[-1], dtype=torch.float64)
    for (_, y), o in zip(d, got):       # rows b*4 ... b*4+3 are sample b's: its mean over all of them
        want.index_add_(0, y, o.double().reshape(y.shape[0], -1, o.shape[-1]).mean(1))
    torch.testing.assert_close(prof.stats[att + "attention.query"]["act_sum"].double(), want, rtol=1e-5, atol=1e-6)
    restructured(model, d, 0.7)
