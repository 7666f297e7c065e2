"""Physical restructure of transformers: whole heads and FFN neurons (docs/method.md §4 "Head units", §6
"Restructure"), on tiny BERT, GPT-2, Llama (grouped-query attention) and ViT built offline from configs."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import neuslice
from neuslice.engine import heads
from neuslice.engine.capture import call_model
from neuslice.engine.graph import Attention
from neuslice.io import container as _io

import hf_models as H

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = [0, 2]


def build(arch):
    model, batch = H.ARCHITECTURES[arch]()
    if arch == "gpt2":
        neuslice.conv1d_to_linear(model)
    return model, batch


def data(batch, arch, n=4, seed=0):
    out = []
    for i in range(n):
        x = batch(6, 7, pad=2 if arch != "vit" else 0, seed=seed + i)
        out.append((x, torch.arange(6) % H.CLASSES))
    return out


def sliced(arch, theta=0.3, layers="removable"):
    model, batch = build(arch)
    d = data(batch, arch)
    names = neuslice.removable_layers(model, d[0][0]) if layers == "removable" else layers
    prof = neuslice.profile(model, d, H.CLASSES, layers=names, progress=False)
    return model, d, prof, neuslice.semantic_slice(prof, "taylor", theta)


def run(model, x):
    with torch.no_grad():
        return call_model(model, x)


@pytest.mark.parametrize("arch", list(H.ARCHITECTURES))
def test_physical_removes_heads_and_ffn_neurons_and_equals_mask_mode(arch):
    model, d, prof, s = sliced(arch)
    assert prof.attention and len(s.attention) == H.LAYERS
    x = d[1][0]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    masked, _ = neuslice.restructure(model, s, KEEP, mode="mask")
    phys, rep = neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    ym, yp = (run(masked, x)), (run(phys, x))
    assert yp.shape == ym.shape == (6, 2)
    assert (yp - ym).abs().max() <= 1e-4 * ym.abs().max()
    total = sum(p.numel() for p in model.parameters())
    assert round(s.compression_rate(model, KEEP) * total) == total - phys.num_params
    assert rep.params == phys.num_params < total
    mods = dict(phys.module.named_modules())
    keep = s.mask(KEEP)
    lost_heads = 0
    for a in s.attention:
        gone = ~heads.unit_keep(a, {n: keep[n].unsqueeze(0) for n in (a.q[0], a.k[0], a.v[0])})[0]
        lost_heads += int(gone.sum())
        assert mods[a.out].in_features == (a.kv_heads - int(gone.sum())) * (a.heads // a.kv_heads) * a.head_dim
        assert mods[a.out].out_features == H.HIDDEN          # the residual width never changes
    assert lost_heads > 0
    ffn = [n for n in keep if n not in {x for a in s.attention for x in (a.q[0], a.k[0], a.v[0])}]
    assert any(mods[n].out_features < H.FFN for n in ffn if n.endswith(("intermediate.dense", "c_fc", "fc1", "up_proj")))
    if arch == "gpt2":
        for a in s.attention:
            assert mods[a.module].split_size == mods[a.out].in_features


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_slices_are_constant_on_heads_and_kv_groups(arch):
    model, d, prof, s = sliced(arch, theta=0.5)
    for a in s.attention:
        g = a.heads // a.kv_heads
        for layer, idx in heads.segments(a):
            c = s.critical_sets[layer][:, idx.flatten()].view(s.num_classes, *idx.shape)
            assert bool((c == c[..., :1]).all())
        q = s.critical_sets[a.q[0]].view(s.num_classes, a.kv_heads, g * a.head_dim)[..., 0]
        kk = s.critical_sets[a.k[0]].view(s.num_classes, a.kv_heads, a.head_dim)[..., 0]
        assert torch.equal(q, kk)
    # mask mode zeroes whole heads: the masked model equals the one with those heads' q/k/v outputs zeroed
    keep = s.mask(KEEP)
    masked, _ = neuslice.restructure(model, s, KEEP, mode="mask")
    handles = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, a, o, k=keep[n]: o * k.to(o.dtype)) for n in keep]
    try:
        want = (run(model, d[0][0]))[:, KEEP]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close((run(masked, d[0][0])), want, rtol=1e-5, atol=1e-6)


def test_unit_score_normalises_each_layer():
    a = Attention("m", ("q", 0), ("k", 0), ("v", 0), "o", 4, 2, 2)
    sc = {"q": torch.tensor([[1., 1, 1, 1, 0, 0, 0, 0]]), "k": torch.tensor([[100., 100, 0, 0]]),
          "v": torch.tensor([[0., 0, 5, 5]])}
    torch.testing.assert_close(heads.unit_scores(a, sc), torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    assert heads.out_columns(a).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_attention_survives_save_and_load_and_old_files_load(tmp_path):
    model, d, prof, s = sliced("llama")
    s.save(tmp_path / "s.safetensors")
    t = neuslice.Slices.load(tmp_path / "s.safetensors", model)
    assert t.attention == s.attention and t.attention[0].kv_heads == 2
    prof.save(tmp_path / "p.safetensors")
    assert neuslice.Profile.load(tmp_path / "p.safetensors").attention == prof.attention
    tensors, doc = _io.read("t", tmp_path / "s.safetensors", "slices")
    meta = {k: v for k, v in doc.items() if k not in ("attention", "format_version", "kind")}
    _io.write("t", tmp_path / "old.safetensors", "slices", tensors, meta)
    assert neuslice.Slices.load(tmp_path / "old.safetensors").attention == []
    bad = dict(meta, attention=[dict(heads.to_entry(s.attention[0]), heads=3)])
    _io.write("t", tmp_path / "bad.safetensors", "slices", tensors, bad)
    with pytest.raises(neuslice.FileFormatError, match=r"field 'attention\[0\].heads' must be a multiple of kv_heads"):
        neuslice.Slices.load(tmp_path / "bad.safetensors")
    wide = dict(meta, attention=[dict(heads.to_entry(s.attention[0]), q=[s.attention[0].q[0], 8])])
    _io.write("t", tmp_path / "wide.safetensors", "slices", tensors, wide)
    with pytest.raises(neuslice.FileFormatError, match=r"field 'attention\[0\].q' needs channels 8..39"):
        neuslice.Slices.load(tmp_path / "wide.safetensors")


def test_narrowing_the_residual_stream_is_an_error_naming_the_layernorm():
    model, d, prof, s = sliced("bert", layers=None)
    with pytest.raises(ValueError, match=r"neuslice.restructure: cannot remove the neurons of layer "
                                         r"'bert.encoder.layer.0.attention.output.dense' physically: its outputs feed "
                                         r"the residual add in 'bert.encoder.layer.0.attention.output' before LayerNorm-like "
                                         r"module 'bert.encoder.layer.0.attention.output.LayerNorm' \(LayerNorm\)"
                                         r".*neuslice.removable_layers"):
        neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])
    assert neuslice.restructure(model, s, KEEP, mode="mask")[0](**d[0][0]).shape == (6, 2)
    names = neuslice.removable_layers(model, d[0][0])
    assert "bert.encoder.layer.0.attention.output.dense" not in names and "bert.encoder.layer.0.output.dense" \
        not in names and "bert.encoder.layer.0.attention.self.value" in names and "classifier" not in names


def test_a_partly_sliced_attention_is_refused_by_name():
    model, d, prof, s = sliced("vit", layers=["vit.layers.0.attention.q_proj", "vit.layers.0.mlp.fc1"])
    assert not s.attention or not heads.active(s.attention, s.layer_names)
    with pytest.raises(ValueError, match=r"layer 'vit.layers.0.attention.q_proj' physically: it holds q/k/v channels "
                                         r"of the attention 'vit.layers.0.attention', whose layers "
                                         r"\['vit.layers.0.attention.k_proj', 'vit.layers.0.attention.v_proj'\] are not "
                                         r"sliced"):
        neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])


@pytest.mark.parametrize("mode", ["global", "category"])
def test_ratio_modes_select_whole_heads(mode):
    model, d, prof, _ = sliced("llama")
    s = (neuslice.global_slice(prof, "avg", 0.5) if mode == "global" else neuslice.category_slice(prof, "avg", 0.5))
    for a in s.attention:
        for layer, idx in heads.segments(a):
            c = s.critical_sets[layer][:, idx.flatten()].view(s.num_classes, *idx.shape)
            assert bool((c == c[..., :1]).all()) and bool(c[..., 0].sum(1).eq(1).all())   # ⌈0.5·2⌉ = 1 kv group
    phys, _ = neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])
    masked, _ = neuslice.restructure(model, s, KEEP, mode="mask")
    torch.testing.assert_close(run(phys, d[2][0]), run(masked, d[2][0]), rtol=1e-4, atol=1e-5)


def test_compression_rate_of_a_model_never_run_needs_example_inputs():
    model, d, prof, s = sliced("bert")
    want = s.compression_rate(model, KEEP)
    fresh, _ = build("bert")                                    # same weights, never probed in this process
    with pytest.raises(ValueError, match=r"cannot be traced .* has not been run through neuslice in this process.*"
                                         r"pass example_inputs="):
        s.compression_rate(fresh, KEEP)
    assert s.compression_rate(fresh, KEEP, example_inputs=d[0][0]) == want


def test_settle_counts_keeps_the_largest_agreeing_set_of_attribute_names():
    """A head count changes; an attribute equal to it by coincidence (Phi's rotary_ndims) does not: the cut model
    is run with every combination, largest first, and a combination whose forward raises counts as disagreeing."""
    from neuslice.maintain._surgery import Count, settle_counts
    blocks = [nn.Module(), nn.Module()]
    for m in blocks:
        m.num_heads, m.rotary_ndims, m.width = 4, 4, 32
    counts = [c for i, m in enumerate(blocks) for c in (Count(m, f"b{i}", "num_heads", 4, 3),
                                                           Count(m, f"b{i}", "rotary_ndims", 4, 3),
                                                           Count(m, f"b{i}", "width", 32, 24))]
    tried = []

    def agrees():
        state = [(m.num_heads, m.rotary_ndims, m.width) for m in blocks]
        tried.append(state[0])
        if any(s[1] != 4 for s in state):
            raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")
        return all(s == (3, 4, 24) for s in state)
    changed = settle_counts(counts, agrees)
    assert changed == {f"b{i}": {"num_heads": (4, 3), "width": (32, 24)} for i in range(2)}
    assert [(m.num_heads, m.rotary_ndims, m.width) for m in blocks] == [(3, 4, 24)] * 2
    assert tried[0] == (3, 3, 24)                      # all of them first
    assert len(tried) == 3                             # then the two-name sets: (num_heads, rotary) fails, next agrees
    # nothing agrees: every candidate stays set, for the caller's check to report
    assert settle_counts(counts, lambda: False) == {f"b{i}": {"num_heads": (4, 3), "rotary_ndims": (4, 3),
                                                              "width": (32, 24)} for i in range(2)}


def test_removable_layers_leave_out_shared_layers():
    """ALBERT calls one layer group for every layer: its layers have shared weights, which restructure cannot
    narrow (each call's readers are not cut as one), so removable_layers never offers them (the pooler is
    left); profile and mask mode still slice them, and physical restructure of them is refused by name."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.AlbertConfig(vocab_size=H.VOCAB, embedding_size=16, hidden_size=H.HIDDEN, num_hidden_layers=2,
                          num_attention_heads=H.HEADS, intermediate_size=H.FFN, num_labels=H.CLASSES,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    model = tf.AlbertForSequenceClassification(cfg).eval()
    x = H._text_batch("right")(6, 7, pad=2)
    assert neuslice.removable_layers(model, x) == ["albert.pooler"]
    ffn = "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn"
    prof = neuslice.profile(model, [(x, torch.arange(6) % H.CLASSES)], H.CLASSES, layers=[ffn, "albert.pooler"],
                            progress=False)
    s = neuslice.semantic_slice(prof, "taylor", 0.3)
    masked, _ = neuslice.restructure(model, s, KEEP, mode="mask")
    assert run(masked, x).shape == (6, 2)
    with pytest.raises(ValueError, match=f"cannot remove the neurons of layer '{ffn}' physically: it is called "
                                         "more than once in forward"):
        neuslice.restructure(model, s, KEEP, example_inputs=x)
    with pytest.warns(UserWarning, match="no sliced layer has such a tap"):     # the pooler reads [B, N]
        p2 = neuslice.profile(model, [(x, torch.arange(6) % H.CLASSES)], H.CLASSES,
                              layers=neuslice.removable_layers(model, x), progress=False)
    ok = neuslice.semantic_slice(p2, "taylor", 0.3)
    phys, _ = neuslice.restructure(model, ok, KEEP, example_inputs=x)
    masked, _ = neuslice.restructure(model, ok, KEEP, mode="mask")
    assert (run(phys, x) - run(masked, x)).abs().max() <= 1e-4 * run(masked, x).abs().max()


def test_removable_layers_says_why_when_none_is_left():
    class Shared(nn.Module):                         # one Linear called twice, then the head
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.a(torch.relu(self.a(x)))))
    with pytest.raises(ValueError, match=r"no layer of the model can be narrowed physically: every sliceable layer "
                                         r"is one of: called more than once in forward, with shared weights \(\['a'\]\)"):
        neuslice.removable_layers(Shared(), torch.randn(4, 8))


def test_removable_layers_of_a_convnext_leave_out_its_residual_stream():
    """ConvNeXt has no attention: Torch-Pruning's dependency graph decides. The patch embedding, depthwise convs,
    pwconv2 and downsampling layers all carry the residual stream (into LayerNorms); only pwconv1 can shrink."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=H.CLASSES,
                            image_size=16, drop_path_rate=0.0)
    model = tf.ConvNextForImageClassification(cfg).eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    names = neuslice.removable_layers(model, x)
    assert names == [f"convnext.encoder.stages.{i}.layers.0.pwconv1" for i in range(2)]
    data = [(torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)), torch.arange(6) % H.CLASSES)
            for i in range(3)]
    s = neuslice.semantic_slice(neuslice.profile(model, data, H.CLASSES, layers=names, progress=False), "taylor", 0.5)
    phys, _ = neuslice.restructure(model, s, KEEP, example_inputs=x)
    masked, _ = neuslice.restructure(model, s, KEEP, mode="mask")
    assert (run(phys, x) - run(masked, x)).abs().max() <= 1e-4 * run(masked, x).abs().max()
    total = sum(p.numel() for p in model.parameters())
    assert total - phys.num_params == round(s.compression_rate(model, KEEP) * total) > 0


INIT = 0.1


def _bert(layers=2, hidden=384, heads=6, ffn=1536, init=INIT):
    """A BERT with all-MiniLM-L6-v2's widths (2 layers), its random weights drawn wider than BERT's default (std 0.02,
    whose logits hardly depend on the input): enough rounding in bfloat16 that mask mode and the physical model
    differ by more than float32's tolerance of the structural check, as pre-trained weights do."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=H.VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                                  num_labels=H.CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  initializer_range=init)
    return transformers.BertForSequenceClassification(cfg).eval()


def _autocast_forward(model, dtype=torch.bfloat16):
    """Wrap ``model.forward`` in CPU autocast as accelerate does for a Trainer run with bf16=True (the wrapper
    stays on the model after training): an instance attribute bound to the model."""
    import types
    f = type(model).forward

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return f(self, *args, **kwargs)
    model.forward = types.MethodType(forward, model)
    return model


def _low(kind):
    model = _bert()
    if kind == "autocast":
        return _autocast_forward(model)
    return model.to(torch.bfloat16 if kind == "bf16" else torch.float16)


@pytest.mark.parametrize("kind", ["bf16", "fp16", "autocast"])
def test_physical_restructure_of_a_model_computing_in_bf16_or_fp16(kind):
    # A model computing in bfloat16 (its dtype, or autocast) was refused by the check against mask mode, whose
    # float32 tolerance its rounding exceeds, with an error blaming the couplings.
    model = _low(kind)
    batch = H._text_batch("right")
    d = [(batch(8, 16, pad=4, seed=i), torch.arange(8) % H.CLASSES) for i in range(2)]
    names = neuslice.removable_layers(model, d[0][0])
    s = neuslice.semantic_slice(neuslice.profile(model, d, H.CLASSES, layers=names, progress=False), "taylor", 0.5)
    masked, _ = neuslice.restructure(model, s, KEEP, mode="mask")
    phys, rep = neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])
    eps = torch.finfo(torch.float16 if kind == "fp16" else torch.bfloat16).eps
    for x, _ in d:
        ym, yp = run(masked, x).float(), run(phys, x).float()
        assert (yp - ym).abs().max() <= 8 * eps * ym.abs().max()
    if kind != "fp16":      # the case needs the wider tolerance: float32's is exceeded on the example inputs
        ym, yp = run(masked, d[0][0]).float(), run(phys, d[0][0]).float()
        assert not torch.allclose(yp, ym, rtol=1e-3, atol=1e-4)
    total = sum(p.numel() for p in model.parameters())
    assert rep.params == phys.num_params < total
    assert round(s.compression_rate(model, KEEP) * total) == total - phys.num_params


@pytest.mark.parametrize("kind", ["fp32", "bf16", "autocast"])
def test_a_wrong_cut_is_still_caught_in_low_precision(kind, monkeypatch):
    # The check's wider tolerance in bfloat16 still refuses a cut that computes something else than mask mode:
    # here one kept head's columns of the output projection zeroed after the surgery.
    from neuslice.maintain import _surgery
    model = _bert() if kind == "fp32" else _low(kind)
    batch = H._text_batch("right")
    d = [(batch(8, 16, pad=4, seed=i), torch.arange(8) % H.CLASSES) for i in range(2)]
    names = neuslice.removable_layers(model, d[0][0])
    s = neuslice.semantic_slice(neuslice.profile(model, d, H.CLASSES, layers=names, progress=False), "taylor", 0.5)
    real = _surgery.physical

    def wrong(*args, **kwargs):
        module, counts = real(*args, **kwargs)
        out = dict(module.named_modules())[s.attention[0].out]
        with torch.no_grad():
            out.weight[:, :out.in_features // 2] = 0
        return module, counts
    monkeypatch.setattr(_surgery, "physical", wrong)
    with pytest.raises(ValueError, match="disagrees with mask mode") as e:
        neuslice.restructure(model, s, KEEP, example_inputs=d[0][0])
    assert ("computing in torch.bfloat16" in str(e.value)) == (kind != "fp32")
