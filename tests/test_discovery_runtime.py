"""Layer discovery by what the model does (docs/method.md §1): the recorded probe forward against the traced
graph, taps, consumers, couplings, residual writers and attention blocks on the model library's
architectures, mask mode against zeroing by hand, and the Conv1D converter."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuslice
import neuslice.models as M
from maintain_fixtures import SMALL
from neuslice.engine.calls import logits_of
from neuslice.engine.graph import Attention, discover


def _summary(plan):
    return ({i.name: (i.tap, i.chain, sorted(i.consumers), i.calls, i.functional) for i in plan.layers},
            sorted(map(sorted, plan.coupled)), plan.attention, plan.residual, plan.heads, plan.unused)


class _SelfAttention(nn.Module):
    def __init__(self, d: int, h: int, sdpa: bool):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.h, self.dh, self.sdpa = h, d // h, sdpa

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.dh).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.dh).transpose(1, 2)
        if self.sdpa:
            c = F.scaled_dot_product_attention(q, k, v)
        else:
            c = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1) @ v
        return self.o(c.transpose(1, 2).reshape(b, t, self.h * self.dh))


class _Block(nn.Module):
    def __init__(self, d: int, h: int, f: int, pre: bool, sdpa: bool):
        super().__init__()
        self.attn = _SelfAttention(d, h, sdpa)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn1, self.act, self.ffn2 = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)
        self.drop = nn.Dropout(0.1)
        self.pre = pre

    def forward(self, x):
        if self.pre:
            x = x + self.attn(self.ln1(x))
            return x + self.drop(self.ffn2(self.act(self.ffn1(self.ln2(x)))))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.drop(self.ffn2(self.act(self.ffn1(x)))))


class TinyTransformer(nn.Module):
    """A traceable transformer written by hand: Linear q/k/v, heads by view/transpose, softmax(q·kᵀ)·v (or
    SDPA), out Linear, residual + LayerNorm, FFN with nn.GELU; tokens [B, T, 4] → logits [B, 3]."""

    def __init__(self, pre: bool = False, sdpa: bool = False, d: int = 16, h: int = 2, f: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, d)
        self.blocks = nn.Sequential(*(_Block(d, h, f, pre, sdpa) for _ in range(2)))
        self.norm = nn.LayerNorm(d) if pre else nn.Identity()
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class _Untraceable(nn.Module):
    """Wraps a model behind a data-dependent branch, so torch.fx cannot trace it."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        if bool(x.sum() > -1e9):
            return self.m(x)
        return self.m(x)


def _digits(arch):
    m = M.build(arch, seed=0, **SMALL[arch]).eval()
    x = torch.randn(3, 64) if arch == "digits_mlp" else torch.randn(3, 1, 8, 8)
    return m, x


TRACEABLE = {**{a: (lambda a=a: _digits(a)) for a in SMALL},
             **{f"tiny_{'pre' if pre else 'post'}_{'sdpa' if sdpa else 'matmul'}":
                (lambda pre=pre, sdpa=sdpa: (TinyTransformer(pre, sdpa).eval(), torch.randn(2, 5, 4)))
                for pre in (False, True) for sdpa in (False, True)}}


@pytest.mark.parametrize("name", list(TRACEABLE))
def test_probe_forward_agrees_with_the_traced_graph(name):
    model, x = TRACEABLE[name]()
    traced = discover(model, run=lambda: model(x))
    probed = discover(model, run=lambda: model(x), _probe=True)
    assert traced.trace_error is None and not traced.probed
    assert probed.probed and {i.tap_source for i in probed.layers} <= {"probe", "layer"}
    assert _summary(probed) == _summary(traced)


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("sdpa", [False, True])
def test_hand_written_transformer_plan(pre, sdpa):
    model, x = TinyTransformer(pre, sdpa).eval(), torch.randn(2, 5, 4)
    for plan in (discover(model, run=lambda: model(x)), discover(model, run=lambda: model(x), _probe=True)):
        layers = {i.name: i for i in plan.layers}
        assert plan.attention == [Attention(f"blocks.{b}.attn", (f"blocks.{b}.attn.q", 0), (f"blocks.{b}.attn.k", 0),
                                            (f"blocks.{b}.attn.v", 0), f"blocks.{b}.attn.o", 2, 8, 2)
                                  for b in range(2)]
        assert layers["blocks.0.ffn1"].tap == "blocks.0.act"
        assert layers["blocks.0.ffn1"].consumers == [("blocks.0.ffn2", 1)]
        assert layers["blocks.0.attn.v"].consumers == [("blocks.0.attn.o", 1)]
        assert layers["blocks.0.attn.q"].consumers == [] and layers["blocks.0.attn.k"].consumers == []
        assert set(plan.residual) == {"embed"} | {f"blocks.{b}.{l}" for b in range(2) for l in ("attn.o", "ffn2")}
        assert "LayerNorm" in plan.residual["blocks.0.ffn2"] and "blocks.0.ffn2" in layers
        # post-LN: each add's sum is normalised, only the embedding and the first add couple; pre-LN: the
        # stream's writers are one group
        assert sorted(map(sorted, plan.coupled)) == ([sorted(plan.residual)] if pre else [["blocks.0.attn.o", "embed"]])


@pytest.mark.parametrize("name", ["tiny_post_matmul", "digits_resnet"])
def test_untraceable_wrapper_gives_the_traced_plan(name):
    """The same model behind a data-dependent branch: profile's probe gives what tracing gave."""
    model, x = TRACEABLE[name]()
    want = discover(model, run=lambda: model(x))
    wrapped = _Untraceable(model)
    got = discover(wrapped, run=lambda: wrapped(x))
    assert got.trace_error is not None and got.probed
    strip = lambda s: s[2:] if s.startswith("m.") else s                       # noqa: E731
    taps = {strip(i.name): (strip(i.tap), sorted((strip(c), k) for c, k in i.consumers)) for i in got.layers}
    assert taps == {i.name: (i.tap, sorted(i.consumers)) for i in want.layers}
    assert sorted(sorted(map(strip, g)) for g in got.coupled) == sorted(map(sorted, want.coupled))


class _OwnActivation(nn.Module):
    """An activation the library has never heard of (no torch class): found by evidence."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _RowNorm(nn.Module):
    """Shape-preserving but not elementwise (mixes channels): never a tap."""

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class _Misordered(nn.Module):
    """Untraceable; modules registered in an order that differs from what reads what: ``drop`` follows ``fc1``
    in registration order but is applied to ``fc2``'s output; ``fc2`` reads ``fc1`` through an own activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.drop, self.fc2, self.act = nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 8), _OwnActivation()
        self.norm, self.fc3, self.head = _RowNorm(), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if bool(x.sum() > -1e9):
            x = x * 1
        h = self.act(self.fc1(x))
        return self.head(self.fc3(self.norm(self.drop(self.fc2(h)))))


def test_taps_and_consumers_come_from_evidence_not_registration_order():
    model, x = _Misordered().eval(), torch.randn(4, 6)
    plan = discover(model, run=lambda: model(x))
    info = {i.name: i for i in plan.layers}
    assert info["fc1"].chain == ["fc1", "act"] and info["fc1"].tap == "act" and info["fc1"].tap_source == "probe"
    assert info["fc1"].consumers == [("fc2", 1)]
    assert info["fc2"].chain == ["fc2", "drop"] and info["fc2"].tap == "fc2"       # the dropout passes through
    assert info["fc2"].consumers == []                                            # read through the norm: no columns
    assert info["fc3"].consumers == [("head", 1)]
    # given only names later (Slices.apply, maintenance), discovery reads the model's last probe ...
    assert _summary(discover(model, ["fc1", "fc2", "fc3"])) == _summary(discover(model, ["fc1", "fc2", "fc3"],
                                                                                 run=lambda: model(x)))
    # ... where module order (a copy never probed) takes drop and fc2 as fc1's chain and consumer
    old = discover(copy.deepcopy(model))
    assert old.layers[0].chain == ["fc1", "drop"] and old.layers[0].consumers == [("fc2", 1)]


# --------------------------------------------------------------------------- the model library's architectures
tf = None


def _hf():
    global tf
    tf = pytest.importorskip("transformers")
    import hf_models
    return hf_models


def _build(arch, **kw):
    hf = _hf()
    model, batch = hf.ARCHITECTURES[arch](**kw)
    if arch == "gpt2":
        neuslice.conv1d_to_linear(model)
    return model.eval(), batch   # as users pass it: its output is a ModelOutput holding .logits


def _call(model, x):
    """The logits, read from the model's output as profile reads them."""
    return logits_of(model(**x) if isinstance(x, dict) else model(x))


# per architecture: FFN1 and its activation module, the attention layers (q, k, v offsets), out, heads
ARCH = {
    "bert": dict(ffn=("bert.encoder.layer.{b}.intermediate.dense", "bert.encoder.layer.{b}.intermediate.intermediate_act_fn"),
                 q=("bert.encoder.layer.{b}.attention.self.query", 0), k=("bert.encoder.layer.{b}.attention.self.key", 0),
                 v=("bert.encoder.layer.{b}.attention.self.value", 0), out="bert.encoder.layer.{b}.attention.output.dense",
                 ffn2="bert.encoder.layer.{b}.output.dense", module="bert.encoder.layer.{b}.attention.self", kv=4),
    "gpt2": dict(ffn=("transformer.h.{b}.mlp.c_fc", "transformer.h.{b}.mlp.act"), q=("transformer.h.{b}.attn.c_attn", 0),
                 k=("transformer.h.{b}.attn.c_attn", 32), v=("transformer.h.{b}.attn.c_attn", 64),
                 out="transformer.h.{b}.attn.c_proj", ffn2="transformer.h.{b}.mlp.c_proj", module="transformer.h.{b}.attn",
                 kv=4),
    "llama": dict(ffn=("model.layers.{b}.mlp.gate_proj", "model.layers.{b}.mlp.act_fn"),
                  q=("model.layers.{b}.self_attn.q_proj", 0), k=("model.layers.{b}.self_attn.k_proj", 0),
                  v=("model.layers.{b}.self_attn.v_proj", 0), out="model.layers.{b}.self_attn.o_proj",
                  ffn2="model.layers.{b}.mlp.down_proj", module="model.layers.{b}.self_attn", kv=2),
    "vit": dict(ffn=("vit.layers.{b}.mlp.fc1", "vit.layers.{b}.mlp.activation_fn"), q=("vit.layers.{b}.attention.q_proj", 0),
                k=("vit.layers.{b}.attention.k_proj", 0), v=("vit.layers.{b}.attention.v_proj", 0),
                out="vit.layers.{b}.attention.o_proj", ffn2="vit.layers.{b}.mlp.fc2", module="vit.layers.{b}.attention",
                kv=4),
}


def _f(s, b):
    return s.format(b=b)


@pytest.mark.parametrize("arch", list(ARCH))
def test_model_library_plan(arch):
    model, batch = _build(arch)
    x = batch(2, 6)
    plan = discover(model, run=lambda: _call(model, x))
    assert plan.trace_error is not None and plan.probed
    info = {i.name: i for i in plan.layers}
    a = ARCH[arch]
    for b in range(2):
        ffn1, act = _f(a["ffn"][0], b), _f(a["ffn"][1], b)
        assert info[ffn1].tap == act and info[ffn1].tap_source == "probe"
        assert info[ffn1].consumers == [(_f(a["ffn2"], b), 1)]
        q, k, v = ((_f(a[r][0], b), a[r][1]) for r in ("q", "k", "v"))
        assert Attention(_f(a["module"], b), q, k, v, _f(a["out"], b), 4, 8, a["kv"]) in plan.attention
        if arch != "gpt2":
            assert info[q[0]].consumers == [] and info[k[0]].consumers == []
            assert info[q[0]].chain == [q[0]] and info[v[0]].chain == [v[0]]     # no dropout of another tensor
        if a["kv"] == 4 and arch != "gpt2":
            assert info[v[0]].consumers == [(_f(a["out"], b), 1)]
        for r in (_f(a["out"], b), _f(a["ffn2"], b)):
            assert r in plan.residual and "LayerNorm-like module" in plan.residual[r]
        assert ffn1 not in plan.residual and q[0] not in plan.residual
    assert len(plan.attention) == 2
    gate_up = [[_f("model.layers.{b}.mlp.gate_proj", b), _f("model.layers.{b}.mlp.up_proj", b)] for b in range(2)]
    # pre-LayerNorm models (all but BERT): the residual stream's writers are one coupled group
    # (a ViT's patch embedding reaches the stream through a transpose, which couples nothing)
    stream = [] if arch == "bert" else [sorted(r for r in plan.residual if "patch" not in r)]
    assert sorted(map(sorted, plan.coupled)) == sorted((gate_up if arch == "llama" else []) + stream)


def test_bert_eager_attention_is_found_as_with_sdpa():
    _hf()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, num_labels=3, attn_implementation="eager")
    model = tf.BertForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(3, 96, (2, 5))}
    plan = discover(model, run=lambda: _call(model, x))
    b = "bert.encoder.layer.0.attention."
    assert plan.attention == [Attention(b + "self", (b + "self.query", 0), (b + "self.key", 0), (b + "self.value", 0),
                                        b + "output.dense", 4, 8, 4)]


def _hand_masked(model, masks, x):
    """Logits with every sliced layer's outputs outside ``masks`` zeroed by hand, at the layer's own output
    (the activations here map 0 to 0, so this is zeroing at the tap)."""
    mods = dict(model.named_modules())

    def hook(mod, args, out, keep):
        k = keep.to(out.dtype)
        return out * (k if isinstance(mod, nn.Linear) else k.view(1, -1, *([1] * (out.dim() - 2))))
    hs = [mods[n].register_forward_hook(lambda m, a, o, k=k: hook(m, a, o, k)) for n, k in masks.items()]
    try:
        with torch.no_grad():
            return _call(model, x)
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("arch", list(ARCH))
def test_profile_and_mask_mode_equal_zeroing_by_hand(arch):
    model, batch = _build(arch)
    x, y = batch(4, 6, seed=1), torch.tensor([0, 1, 2, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # an unused pooler, where there is one
        prof = neuslice.profile(model, [(x, y)], 3, metrics=("avg", "taylor"), progress=False)
    taps = {e["name"]: e["tap"] for e in prof.layers}
    for b in range(2):
        assert taps[_f(ARCH[arch]["ffn"][0], b)] == _f(ARCH[arch]["ffn"][1], b)
    slices = neuslice.global_slice(prof, "taylor", 0.5)
    g = torch.Generator().manual_seed(3)
    slices.critical_sets = {n: torch.rand(c.shape, generator=g) < 0.5 for n, c in slices.critical_sets.items()}
    masks = slices.mask([0])
    with torch.no_grad():
        plain = _call(model, x)
    want = _hand_masked(model, masks, x)
    assert (want - plain).abs().max() > 1e-3                 # the masks change the output
    fresh = copy.deepcopy(model)                             # no probe recorded: Slices.apply probes itself
    for m in (model, fresh):
        with slices.apply(m, [0]) as mm, torch.no_grad():
            got = _call(mm, x)
            again = _call(mm, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(again, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(_call(fresh, x), plain, rtol=0, atol=0)   # hooks gone on exit


# --------------------------------------------------------------------------- Conv1D → Linear
def test_conv1d_to_linear_is_exact_and_named_when_missing():
    hf = _hf()
    model, batch = hf.gpt2()
    x = batch(2, 6)
    with torch.no_grad():
        want = model(**x).logits
    with pytest.raises(ValueError, match=r"no sliceable layer.*transformer\.h\.0\.attn\.c_attn.*"
                                         r"neuslice\.conv1d_to_linear\(model\)"):
        discover(model, run=lambda: model(**x))
    names = neuslice.engine.compat.transposed_linears(model)
    assert len(names) == 8 and "transformer.h.1.mlp.c_proj" in names
    old = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    assert neuslice.conv1d_to_linear(model) is model
    lin = model.transformer.h[0].attn.c_attn
    assert type(lin) is nn.Linear and (lin.in_features, lin.out_features) == (32, 96)
    assert torch.equal(lin.weight, old.t())
    assert neuslice.engine.compat.transposed_linears(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="conv1d_to_linear: model must be a torch.nn.Module"):
        neuslice.conv1d_to_linear("gpt2")


def test_conv1d_to_linear_leaves_other_modules_alone():
    class T(nn.Module):                                   # y = x @ W + b with W [in, out]
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3))
            self.bias = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x @ self.weight + self.bias

    class NotT(T):                                        # same parameters, another function
        def forward(self, x):
            return torch.relu(x @ self.weight + self.bias)

    model = nn.Sequential(T(), nn.Linear(3, 5), NotT(), nn.Embedding(4, 3))
    x = torch.randn(2, 5)
    want = model[2](model[1](model[0](x)))
    neuslice.conv1d_to_linear(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, NotT, nn.Embedding]
    torch.testing.assert_close(model[2](model[1](model[0](x))), want)


def test_an_in_place_activation_is_a_tap_not_a_pass_through():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)

        def forward(self, x):
            if bool(x.sum() > -1e9):
                x = x * 1
            return self.head(self.act(self.fc(x)))
    model, x = Net().eval(), torch.randn(5, 4)
    plan = discover(model, run=lambda: model(x))
    assert plan.layers[0].chain == ["fc", "act"] and plan.layers[0].tap == "act"


def test_deeplift_rescales_through_a_model_library_activation_found_by_evidence():
    """BERT's FFN nonlinearity is transformers' GELUActivation, not nn.GELU: the probe finds it elementwise, so
    DeepLIFT applies the Rescale rule there; the profile equals that of the same model with nn.GELU swapped in."""
    hf = _hf()
    model, batch = hf.bert()
    model = model.double()
    swapped = copy.deepcopy(model)
    for layer in swapped.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = nn.GELU()
    x, y = batch(6, 7, pad=2), torch.tensor([0, 1, 2, 0, 1, 2])
    names = [n for n, m in model.named_modules() if n.endswith("intermediate.dense")]
    got = neuslice.profile(model, [(x, y)], 3, layers=names, metrics=("deeplift",), progress=False)
    want = neuslice.profile(swapped, [(x, y)], 3, layers=names, metrics=("deeplift",), progress=False)
    assert got.deeplift == want.deeplift == "rescale"
    plain = neuslice.profile(model, [(x, y)], 3, layers=names, metrics=("taylor",), progress=False)
    for n in names:
        torch.testing.assert_close(got.stats[n]["deeplift_sum"], want.stats[n]["deeplift_sum"], rtol=1e-12, atol=1e-12)
        # the Rescale multipliers differ from the gradient (a zero reference is not the input)
        assert not torch.allclose(got.stats[n]["deeplift_sum"], plain.stats[n]["taylor_sum"])
