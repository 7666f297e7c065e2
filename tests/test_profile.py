"""neuslice.profile: statistics against hand loops and Captum, taps, state, hooks, errors (digits)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuslice
from neuslice.engine.slices import STATS
from helpers import TokenNet as _TokenNet, WideHead, spread_labels, token_data as _token_data
from slicing_fixtures import F32, relu_cnn, small_loader, stats_close, trained

K = 10


def _hand_stats(model, loader, taps, target="logit", deeplift_mults=None):
    """docs/method.md §2 by loops over samples, in float64: {layer: {stat: tensor}}; taps: {layer: tap module name}."""
    m64 = copy.deepcopy(model).double().eval()
    mods = dict(m64.named_modules())
    out = {l: {s: torch.zeros((K,) if s == "count" else (K, mods[l].weight.shape[0]), dtype=torch.float64)
               for s in STATS} for l in taps}
    for x, y in loader:
        for b in range(x.shape[0]):
            got = {}
            hs = [mods[t].register_forward_hook(lambda m, a, o, l=l: got.__setitem__(l, o)) for l, t in taps.items()]
            logits = m64(x[b:b + 1].double())
            for h in hs:
                h.remove()
            k = int(y[b])
            tgt = logits[0, k] if target == "logit" else F.cross_entropy(logits, y[b:b + 1])
            grads = torch.autograd.grad(tgt, [got[l] for l in taps])
            for (l, _), g in zip(taps.items(), grads):
                a = got[l][0].detach().reshape(g.shape[1], -1)
                g = g[0].reshape(a.shape)
                st = out[l]
                st["count"][k] += 1
                st["act_sum"][k] += a.mean(1)
                st["act_sq"][k] += a.mean(1) ** 2
                st["taylor_sum"][k] += (a * g).sum(1).abs()
    return out


def _stats(p):
    return p.stats


def _all_classes(monkeypatch, module, k):
    """The per-batch path before classes-present buffers: every class counts as present, so each batch
    accumulates into [K, N] buffers with the labels as they are."""
    monkeypatch.setattr(module, "present_classes", lambda y, ignore_index=-100: (torch.arange(k, device=y.device), y))


def _wide_data(k):
    x, y = next(iter(small_loader(60, 60)))
    y = spread_labels(y, k)
    return [(x[:25], y[:25]), (x[25:], y[25:])]


@pytest.mark.parametrize("k", [3, 500])
def test_batch_buffers_hold_the_classes_present_and_give_the_full_buffers_numbers(k, monkeypatch):
    """Per batch only the classes present get buffer rows (memory and time do not grow with K), and the
    profile is the one [K, N] buffers gave, to the bit: the statistics are sums, each row added once."""
    from neuslice.engine import profile as offline
    model, data = WideHead(k).eval(), _wide_data(k)
    rows = []
    real = neuslice.ops.accumulate_trusted_
    monkeypatch.setattr(neuslice.ops, "accumulate_trusted_", lambda *a: (rows.append(a[5].shape[0]), real(*a))[1])
    new = neuslice.profile(model, data, k, progress=False)
    assert new.deeplift == "rescale" and len(rows) == 2 * 2 * 2
    assert rows == [len(y.unique()) for _, y in data for _ in range(4)] and max(rows) <= min(k, 10)
    _all_classes(monkeypatch, offline, k)
    old = neuslice.profile(model, data, k, progress=False)
    assert (old.counts.sum(), (new.counts > 0).sum()) == (60, min(k, 10))
    stats_close(new.stats, old.stats, rtol=0, atol=0)


@pytest.mark.parametrize("k", [4, 300])
def test_per_token_labels_with_absent_classes_equal_the_full_buffers(k, monkeypatch):
    from neuslice.engine import profile as offline
    model = _TokenNet(pooled=False).eval()
    model.head = nn.Linear(8, k)
    data = [(tok, y if k == 4 else y * 70 + 9) for tok, y in _token_data(per_token=True)]   # 4 of 300 present
    new = neuslice.profile(model, data, k, progress=False)
    assert float(new.counts.sum()) == 60 and int((new.counts > 0).sum()) == 4
    _all_classes(monkeypatch, offline, k)
    stats_close(new.stats, neuslice.profile(model, data, k, progress=False).stats, rtol=0, atol=0)


def test_a_batch_non_finite_in_its_second_layer_changes_no_total(deferred):
    """All or nothing: the first layer's sums of a rejected batch never reach the totals."""
    from neuslice.engine.graph import discover
    from neuslice.engine.profile import _Offline
    model, ((x, y), (x2, y2)) = WideHead(500).eval(), _wide_data(500)
    plan = discover(model, None, tap="auto", fn="t", run=lambda: model(x))
    run = _Offline("t", model, plan, 500, ("avg", "var"), "logit", None)
    try:
        run.batch(x, y)
        before = {n: {s: v.clone() for s, v in st.items()} for n, st in run.totals.items()}
        model.poison = True
        with pytest.raises(neuslice.NonFiniteError, match=r"layer 'fc2'.*no statistic changed"):
            run.batch(x2, y2)
    finally:
        run.close()
    assert list(run.totals) == ["fc1", "fc2"] and run.num_batches == 1
    stats_close(run.totals, before, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["logit", "loss"])
def test_cnn_statistics_match_hand_loops(target):
    model = trained()
    loader = small_loader(90, 30)
    prof = neuslice.profile(model, loader, K, metrics=("avg", "var", "taylor"), target=target, progress=False)
    taps = {e["name"]: e["tap"] for e in prof.layers}
    assert taps == {"features.0": "features.2", "features.4": "features.6"}
    assert [e["tap_source"] for e in prof.layers] == ["graph", "graph"]
    stats_close(_stats(prof), _hand_stats(model, loader, taps, target), keys=["count", "act_sum", "act_sq",
                                                                              "taylor_sum"])


def _mlp_deeplift_by_hand(model, loader):
    """Rescale-rule multipliers of f_y written out for Linear-ReLU-Linear-ReLU-Linear, zero baseline."""
    w1, b1 = model.body[1].weight.double(), model.body[1].bias.double()
    w2, b2 = model.body[3].weight.double(), model.body[3].bias.double()
    w3 = model.head.weight.double()
    a1r = b1.relu()
    h2r = w2 @ a1r + b2
    a2r = h2r.relu()
    out = {"body.1": torch.zeros(K, w1.shape[0], dtype=torch.float64),
           "body.3": torch.zeros(K, w2.shape[0], dtype=torch.float64)}
    for x, y in loader:
        for xb, yb in zip(x.double().flatten(1), y):
            h1 = w1 @ xb + b1
            a1 = h1.relu()
            h2 = w2 @ a1 + b2
            a2 = h2.relu()
            m_a2 = w3[int(yb)]
            d = h2 - h2r
            resc = torch.where(d.abs() > 1e-7, (a2 - a2r) / torch.where(d.abs() > 1e-7, d, torch.ones_like(d)),
                               (h2 > 0).double())
            m_a1 = w2.t() @ (m_a2 * resc)
            out["body.1"][int(yb)] += ((a1 - a1r) * m_a1).abs()
            out["body.3"][int(yb)] += ((a2 - a2r) * m_a2).abs()
    return out


def test_mlp_every_statistic_matches_hand_loops():
    model = trained("digits_mlp", epochs=5)
    loader = small_loader(100, 25, flatten=True)
    prof = neuslice.profile(model, loader, K, progress=False)
    assert prof.deeplift == "rescale" and prof.metrics == ("avg", "var", "taylor", "deeplift")
    taps = {e["name"]: e["tap"] for e in prof.layers}
    assert taps == {"body.1": "body.2", "body.3": "body.4"}
    stats_close(_stats(prof), _hand_stats(model, loader, taps), keys=["count", "act_sum", "act_sq", "taylor_sum"])
    hand = _mlp_deeplift_by_hand(model, loader)
    for layer, v in hand.items():
        torch.testing.assert_close(prof.stats[layer]["deeplift_sum"], v, **F32)


class _TwinMLP(nn.Module):
    """Linear-act-Linear-act-head whose first layer has two identical units (0 and 1) and whose second layer's
    unit 0 reads them as ``a1[0] - a1[1]``: its input difference to the zero baseline is exactly 0 for every
    sample, while the first layer's units 0 and 1 differ from their reference, so the Rescale rule must use the
    nonlinearity's local derivative there (docs/method.md §2) for the first layer's multipliers to be right."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.a1, self.l2, self.a2, self.head = nn.Linear(8, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 3)
        with torch.no_grad():
            self.l1.weight[1] = self.l1.weight[0]
            self.l1.bias[1] = self.l1.bias[0]
            self.l2.weight[0] = 0.0
            self.l2.weight[0, 0], self.l2.weight[0, 1] = 1.0, -1.0
            self.l2.bias[0] = 0.7

    def forward(self, x):
        return self.head(self.a2(self.l2(self.a1(self.l1(x)))))


def _twin_deeplift_by_hand(model, loader, k, scale_local=1.0):
    """The Rescale multipliers of f_y at the first layer's tap, float64, one sample at a time (the local
    derivative times ``scale_local``)."""
    m = copy.deepcopy(model).double()
    f = m.a1
    out = torch.zeros(k, 6, dtype=torch.float64)
    a1r = f(m.l1(torch.zeros(8, dtype=torch.float64)))
    h2r = m.l2(a1r)
    for x, y in loader:
        for xb, yb in zip(x.double(), y):
            a1 = f(m.l1(xb))
            h2 = m.l2(a1).detach().requires_grad_(True)
            local, = torch.autograd.grad(f(h2).sum(), h2)
            d = (h2 - h2r).detach()
            resc = torch.where(d.abs() > 1e-7, (f(h2) - f(h2r)).detach() / torch.where(d.abs() > 1e-7, d, 1.0),
                               local * scale_local)
            m_a1 = m.l2.weight.t() @ (m.head.weight[int(yb)] * resc)
            out[int(yb)] += ((a1 - a1r) * m_a1).abs().detach()
    return out


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
@pytest.mark.parametrize("local", [True, False], ids=["local", "masked"])
def test_rescale_takes_the_local_derivative_where_the_input_difference_is_zero(act, local, monkeypatch):
    from neuslice.engine import deeplift
    if not local:                       # the other path: through the nonlinearity's own backward, masked
        monkeypatch.setattr(deeplift, "_local", lambda module: None)
    model = _TwinMLP(act).eval()
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    prof = neuslice.profile(model, loader, 3, layers=["l1", "l2"], metrics=("deeplift",), progress=False)
    assert prof.deeplift == "rescale"
    hand = _twin_deeplift_by_hand(model, loader, 3)
    torch.testing.assert_close(prof.stats["l1"]["deeplift_sum"], hand, **F32)
    # the local derivative matters here: without it the first layer's twin units 0 and 1 come out different
    without = _twin_deeplift_by_hand(model, loader, 3, scale_local=0.0)
    assert not torch.allclose(prof.stats["l1"]["deeplift_sum"][:, :2], without[:, :2], rtol=1e-3)


def _captum_per_class(attr_fn, model, loader, layer_module, **kw):
    sums = torch.zeros(K, layer_module_n(model, layer_module), dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    for x, y in loader:
        a = attr_fn(x, target=y, **kw)
        a = a.reshape(a.shape[0], a.shape[1], -1).sum(-1).abs().double()
        sums.index_add_(0, y, a)
        count.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
    return sums / count.unsqueeze(1)


def layer_module_n(model, module):
    x = torch.zeros(1, 1, 8, 8)
    got = []
    h = module.register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0].shape[1]


def test_taylor_matches_captum_layer_gradient_x_activation():
    from captum.attr import LayerGradientXActivation
    model = trained()
    loader = small_loader(120, 40)
    prof = neuslice.profile(model, loader, K, metrics=("taylor",), progress=False)
    scores = prof.score("taylor")
    for e in prof.layers:
        tap = dict(model.named_modules())[e["tap"]]
        want = _captum_per_class(LayerGradientXActivation(model, tap).attribute, model, loader, tap)
        torch.testing.assert_close(scores[e["name"]], want, **F32)


def test_deeplift_matches_captum_layer_deeplift():
    from captum.attr import LayerDeepLift
    model = relu_cnn()
    loader = small_loader(120, 40)
    prof = neuslice.profile(model, loader, K, metrics=("deeplift",), progress=False)
    assert prof.deeplift == "rescale"
    scores = prof.score("deeplift")
    mods = dict(model.named_modules())
    for e in prof.layers:
        tap = mods[e["tap"]]
        want = _captum_per_class(LayerDeepLift(model, tap).attribute, model, loader, tap,
                                 baselines=torch.zeros(1, 1, 8, 8))
        torch.testing.assert_close(scores[e["name"]], want, **F32)
    # the Rescale multipliers really differ from the gradient on this model
    taylor = neuslice.profile(model, loader, K, metrics=("taylor",), progress=False).score("taylor")
    assert not torch.allclose(scores["features.3"], taylor["features.3"], rtol=1e-3)


def _hooks_of(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_state_unchanged():
    model = trained()
    model.train()
    model.features[1].eval()                       # mixed modes must come back as they were
    model.features[2].inplace = True
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    neuslice.profile(model, small_loader(60, 30), K, progress=False)
    assert [m.training for m in model.modules()] == modes
    assert model.features[2].inplace is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert _hooks_of(model) == 0


def test_hooks_removed_after_an_exception():
    model = trained()

    def data():
        yield from small_loader(60, 30)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        neuslice.profile(model, data(), K, progress=False)
    assert _hooks_of(model) == 0
    x, y = next(iter(small_loader(60, 30)))
    bad = [(x, y), (x, y.clone().fill_(10))]
    with pytest.raises(ValueError, match=r"neuslice.profile: labels must lie in \[0, 10\).*got label 10"):
        neuslice.profile(model, bad, K, progress=False)
    assert _hooks_of(model) == 0 and not model.training


def test_same_seed_same_profile_and_slices():
    a = neuslice.profile(trained(), small_loader(), K, progress=False)
    b = neuslice.profile(trained(), small_loader(), K, progress=False)
    for layer in a.layer_names:
        for s in STATS:
            assert torch.equal(a.stats[layer][s], b.stats[layer][s])
    sa, sb = (neuslice.semantic_slice(p, "ens", 0.95) for p in (a, b))
    assert all(torch.equal(sa.critical_sets[n], sb.critical_sets[n]) for n in sa.layer_names)


def test_forward_only_without_gradient_metrics():
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise AssertionError("a backward pass ran")

    model = trained()
    grad_modes = []
    model.features[0].register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    model.head.register_forward_hook(lambda m, a, o: NoBackward.apply(o))
    prof = neuslice.profile(model, small_loader(60, 30), K, metrics=("avg", "var"), progress=False)
    assert grad_modes == [False, False]
    assert prof.statistics == ("count", "act_sum", "act_sq")          # only what avg and var read
    assert all(set(prof.stats[n]) == {"count", "act_sum", "act_sq"} for n in prof.layer_names)
    with pytest.raises(ValueError, match=r"metric 'taylor' needs the statistic\(s\) \['taylor_sum'\]"):
        prof.score("taylor")


def test_all_accumulation_goes_through_the_op(monkeypatch):
    calls = []
    real = neuslice.ops.accumulate_trusted_
    monkeypatch.setattr(neuslice.ops, "accumulate_trusted_", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    neuslice.profile(trained(), small_loader(60, 30), K, progress=False)
    assert len(calls) == 2 * 2 * 2      # 2 batches × 2 layers × (gradient call + Rescale multiplier call)
    calls.clear()
    neuslice.profile(trained(), small_loader(60, 30), K, metrics=("avg", "taylor"), progress=False)
    assert len(calls) == 2 * 2


class _TwoLayer(nn.Module):
    """Linear-ReLU ×2 + head, with knobs: one shared ReLU module, functional ReLU (F.relu, torch.relu or the
    method), or untraceable forward."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1, self.act = nn.Linear(64, 32), nn.ReLU()          # registered in the order they run
        self.fc2, self.act2 = nn.Linear(32, 16), nn.ReLU()
        self.head = nn.Linear(16, K)

    def forward(self, x):
        x = x.flatten(1)
        if self.kind == "functional":
            return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))
        if self.kind == "torch.relu":
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        if self.kind == "method":
            return self.head(self.fc2(self.fc1(x).relu()).relu())
        if self.kind == "shared":
            return self.head(self.act(self.fc2(self.act(self.fc1(x)))))
        if self.kind == "untraceable" and bool(x.sum() > -1e9):      # data-dependent: fx cannot trace it
            return self.head(self.act2(self.fc2(self.act(self.fc1(x)))))
        return self.head(self.act2(self.fc2(self.act(self.fc1(x)))))


def _twin(kind):
    torch.manual_seed(1)
    base = _TwoLayer("plain")
    m = _TwoLayer(kind)
    m.load_state_dict(base.state_dict())
    return base.eval(), m.eval()


@pytest.mark.parametrize("kind", ["shared", "untraceable"])
def test_taps_found_for_shared_modules_and_by_module_order(kind):
    base, model = _twin(kind)
    loader = small_loader(60, 30)
    want = neuslice.profile(base, loader, K, progress=False)
    got = neuslice.profile(model, loader, K, progress=False)
    assert [e["tap"] for e in got.layers] == (["act", "act"] if kind == "shared" else ["act", "act2"])
    assert {e["tap_source"] for e in got.layers} == {"graph" if kind == "shared" else "probe"}
    stats_close(got.stats, want.stats, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["functional", "torch.relu", "method"])
def test_functional_nonlinearity_is_tapped_after_the_function_and_rescaled_for_deeplift(kind, monkeypatch):
    """A functional nonlinearity at a sliced layer's output is read after it and takes the Rescale rule as a
    module does: every statistic, DeepLIFT's included, equals the nn.ReLU version's (the second layer's ReLU lies
    on the first layer's path to the output, so the first layer's multipliers go through its Rescale)."""
    base, model = _twin(kind)
    loader = small_loader(60, 30)
    metrics = ("avg", "var", "taylor", "deeplift")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = neuslice.profile(model, loader, K, metrics=metrics, progress=False)
    assert [e["tap"] for e in prof.layers] == ["relu(fc1)", "relu(fc2)"]
    assert [e["tap_source"] for e in prof.layers] == ["graph", "graph"]
    assert prof.deeplift == "rescale" and [e["deeplift"] for e in prof.layers] == ["rescale"] * 2
    want = neuslice.profile(base, loader, K, metrics=metrics, progress=False)
    stats_close(prof.stats, want.stats, keys=["count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum"],
                rtol=1e-6, atol=1e-9)
    # and the Rescale rule at the functional ReLU is what made them equal: through its plain derivative, the first
    # layer's (upstream of it) differ
    from neuslice.engine.deeplift import Rescale
    monkeypatch.setattr(Rescale, "functional", lambda self, i, inp, out, local: None)
    plain = neuslice.profile(model, loader, K, metrics=metrics, progress=False)
    assert not torch.allclose(plain.stats["fc1"]["deeplift_sum"], want.stats["fc1"]["deeplift_sum"], rtol=1e-3)
    stats_close(plain.stats, want.stats, keys=["taylor_sum"], rtol=1e-6, atol=1e-9)
    lay = neuslice.profile(model, loader, K, tap="layer", metrics=("taylor",), progress=False)
    assert [e["tap"] for e in lay.layers] == ["fc1", "fc2"]
    # for a ReLU, z·∂f/∂z = a·∂f/∂a: taylor is the same at either tap
    stats_close(lay.stats, want.stats, keys=["taylor_sum"], rtol=1e-5, atol=1e-7)


class _UntracedFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, K)

    def forward(self, x):
        x = x.flatten(1)
        if bool(x.sum() > -1e9):                          # data-dependent: fx cannot trace it
            x = x * 1
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_untraceable_functional_nonlinearity_is_seen_by_the_probe_forward():
    """docs/method.md §1: where tracing fails, the probe forward records the functional F.relu after each
    layer, so the tap is after it (as on the traced graph) and nothing warns."""
    model = _UntracedFunctional().eval()
    loader = small_loader(60, 30)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = neuslice.profile(model, loader, K, metrics=("avg",), progress=False)
        with neuslice.Profiler(model, K, metrics=("avg",)) as p:
            x, y = next(iter(loader))
            with p.batch(y):
                model(x)
    assert [e["tap"] for e in prof.layers] == ["relu(fc1)", "relu(fc2)"]
    assert [e["tap_source"] for e in prof.layers] == ["probe", "probe"]
    assert [i.tap for i in p.plan.layers] == ["relu(fc1)", "relu(fc2)"]
    # the same statistics as the traceable twin, read after the function
    model2 = _UntracedFunctional().eval()
    model2.load_state_dict(model.state_dict())
    want = neuslice.profile(_Traced(model2), loader, K, metrics=("avg",), progress=False)
    stats_close(prof.stats, want.stats, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # tap='layer' asks for the layer output: no warning
        neuslice.profile(model, loader, K, metrics=("avg",), tap="layer", progress=False)


class _Traced(nn.Module):
    """``_UntracedFunctional``'s layers, traceable (no data-dependent branch)."""

    def __init__(self, m):
        super().__init__()
        self.fc1, self.fc2, self.head = m.fc1, m.fc2, m.head

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class _HeadFirst(nn.Module):
    """Untraceable; the head is registered before the hidden layer it follows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.head = nn.Linear(16, K)
        self.fc, self.act = nn.Linear(64, 16), nn.ReLU()

    def forward(self, x):
        x = x.flatten(1)
        if bool(x.sum() > -1e9):                          # data-dependent: fx cannot trace it
            x = x * 1
        return self.head(self.act(self.fc(x)))


def test_untraceable_head_is_found_from_the_output_not_registration_order():
    model = _HeadFirst().eval()
    loader = small_loader(60, 30)
    prof = neuslice.profile(model, loader, K, progress=False)
    assert prof.layer_names == ["fc"] and [e["tap"] for e in prof.layers] == ["act"]
    with neuslice.Profiler(model, K) as p:              # probed on the first batch
        for x, y in loader:
            with p.batch(y):
                F.cross_entropy(model(x), y, reduction="sum").backward()
    assert p.profile().layer_names == ["fc"] and p.profile().num_batches == 2
    want = neuslice.profile(model, loader, K, metrics=("avg", "var", "taylor"), target="loss", progress=False)
    stats_close(p.profile().stats, want.stats, keys=["count", "act_sum", "act_sq", "taylor_sum"])
    assert _hooks_of(model) == 0
    base = torch.zeros(1, 1, 8, 8)                      # with a baseline: probed at construction
    with neuslice.Profiler(model, K, metrics=("deeplift",), baseline=base) as p2:
        assert p2.plan.layers[0].name == "fc"


class _Twice(nn.Module):
    """``shared`` (Linear 16→16, then ReLU) runs twice per forward; ``untraceable`` adds a data-dependent branch."""

    def __init__(self, untraceable: bool = False, last_bare: bool = False):
        super().__init__()
        torch.manual_seed(5)
        self.untraceable, self.last_bare = untraceable, last_bare
        self.fc0, self.act0 = nn.Linear(64, 16), nn.ReLU()          # module order finds both chains
        self.shared, self.act = nn.Linear(16, 16), nn.ReLU()
        self.head = nn.Linear(16, K)

    def forward(self, x):
        h = self.act0(self.fc0(x.flatten(1)))
        if self.untraceable and bool(h.sum() > -1e9):
            h = h * 1
        h = self.act(self.shared(h))
        h = self.shared(h) if self.last_bare else self.act(self.shared(h))
        return self.head(h)


def _twice_by_hand(model, loader, target="logit"):
    """docs/method.md §2 for ``shared``: both calls' taps joined along s, per sample, float64."""
    w0, b0 = model.fc0.weight.double(), model.fc0.bias.double()
    ws, bs = model.shared.weight.double(), model.shared.bias.double()
    wh, bh = model.head.weight.double(), model.head.bias.double()
    st = {s: torch.zeros((K,) if s == "count" else (K, 16), dtype=torch.float64) for s in STATS}
    for x, y in loader:
        for xb, yb in zip(x.double().flatten(1), y):
            a1 = (ws @ (w0 @ xb + b0).relu() + bs).relu()
            a2 = (ws @ a1 + bs).relu()
            out = wh @ a2 + bh
            k = int(yb)
            tgt = out[k] if target == "logit" else F.cross_entropy(out[None], yb[None])
            g1, g2 = torch.autograd.grad(tgt, [a1, a2])
            xs, gs = torch.stack([a1, a2], 1).detach(), torch.stack([g1, g2], 1)   # [N, S = 2 calls]
            st["count"][k] += 1
            st["act_sum"][k] += xs.mean(1)
            st["act_sq"][k] += xs.mean(1) ** 2
            st["taylor_sum"][k] += (xs * gs).sum(1).abs()
    return st


@pytest.mark.parametrize("untraceable", [False, True])
def test_layer_called_twice_contributes_every_call(untraceable):
    model = _Twice(untraceable).eval()
    loader = small_loader(60, 30)
    prof = neuslice.profile(model, loader, K, metrics=("avg", "var", "taylor"), progress=False)
    assert prof.layer_names == ["fc0", "shared"] and [e["tap"] for e in prof.layers] == ["act0", "act"]
    hand = _twice_by_hand(model, loader)
    for s in ("count", "act_sum", "act_sq", "taylor_sum"):
        torch.testing.assert_close(prof.stats["shared"][s], hand[s], **F32)
    named = neuslice.profile(model, loader, K, layers=["shared"], metrics=("avg",), progress=False)
    torch.testing.assert_close(named.stats["shared"]["act_sum"], hand["act_sum"], **F32)


def test_layer_called_twice_is_masked_in_every_call_and_refused_physically():
    model = _Twice().eval()
    loader = small_loader(60, 30)
    sl = neuslice.category_slice(neuslice.profile(model, loader, K, metrics=("avg",), progress=False), "avg", 0.5)
    keep = sl.mask([3])
    x, _ = next(iter(loader))
    m0, ms = keep["fc0"].double(), keep["shared"].double()
    h = (model.fc0(x.flatten(1)).double().relu()) * m0
    w, b = model.shared.weight.double(), model.shared.bias.double()
    h = (h @ w.t() + b).relu() * ms
    h = (h @ w.t() + b).relu() * ms
    want = h @ model.head.weight.double().t() + model.head.bias.double()
    with torch.no_grad(), sl.apply(model, [3]) as masked:
        got = masked(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layer 'shared' physically: it is called more than once.*mode='mask'"):
        neuslice.restructure(model, sl, [3], mode="physical", example_inputs=x[:2])


def test_calls_followed_by_different_modules_are_refused_naming_the_layer():
    model = _Twice(last_bare=True).eval()
    with pytest.raises(ValueError, match=r"neuslice.profile: layer 'shared' is called 2 times in forward and its "
                                         r"calls are followed by different .*choose layers= without 'shared'"):
        neuslice.profile(model, small_loader(20, 20), K, progress=False)
    prof = neuslice.profile(model, small_loader(20, 20), K, layers=["fc0"], metrics=("avg",), progress=False)
    assert prof.layer_names == ["fc0"]
    untraced = _Twice(untraceable=True, last_bare=True).eval()       # the probe forward sees the same
    with pytest.raises(ValueError, match=r"neuslice.profile: layer 'shared' is called 2 times in forward and its "
                                         r"calls are followed by different .*choose layers= without 'shared'"):
        neuslice.profile(untraced, small_loader(20, 20), K, progress=False)


def test_layer_selection_by_name_type_and_predicate():
    model = trained()
    loader = small_loader(40, 40)
    by_name = neuslice.profile(model, loader, K, layers=["features.4"], metrics=("avg",), progress=False)
    assert by_name.layer_names == ["features.4"]
    # a type or a predicate never selects the head (docs/method.md §1); its name does
    with pytest.raises(ValueError, match=r"no sliceable layer.*other than the head \['head'\], which only its name"):
        neuslice.profile(model, loader, K, layers=nn.Linear, metrics=("avg",), progress=False)
    by_type = neuslice.profile(model, loader, K, layers=(nn.Conv2d, nn.Linear), metrics=("avg",), progress=False)
    assert by_type.layer_names == ["features.0", "features.4"]
    assert neuslice.profile(model, loader, K, layers=lambda n, m: True, metrics=("avg",),
                            progress=False).layer_names == ["features.0", "features.4"]
    named = neuslice.profile(model, loader, K, layers=["head", nn.Conv2d], metrics=("avg",), progress=False)
    assert named.layer_names == ["features.0", "features.4", "head"]
    by_pred = neuslice.profile(model, loader, K, layers=lambda n, m: m.out_channels == 16 if
                               isinstance(m, nn.Conv2d) else False, metrics=("avg",), progress=False)
    assert by_pred.layer_names == ["features.0"]


@pytest.mark.parametrize("per_token", [True, False])
def test_channels_last_ffn_neurons_per_token_and_per_sequence_labels(per_token):
    model = _TokenNet(pooled=not per_token).eval()
    data = _token_data(per_token)
    prof = neuslice.profile(model, data, 4, metrics=("avg", "var", "taylor"), progress=False)
    assert prof.layer_names == ["ffn1", "ffn2"] and [e["tap"] for e in prof.layers] == ["act", "ffn2"]
    mods = dict(model.named_modules())
    for layer, tap in (("ffn1", "act"), ("ffn2", "ffn2")):
        st = {s: torch.zeros((4,) if s == "count" else (4, mods[layer].out_features), dtype=torch.float64)
              for s in STATS}
        for tok, y in data:
            got = []
            h = mods[tap].register_forward_hook(lambda m, a, o: got.append(o))
            out = model(tok)
            h.remove()
            a = got[0]                                                       # [B, T, N]
            g = torch.autograd.grad(out.gather(-1, y.unsqueeze(-1)).sum(), a)[0]
            a, g = a.detach().double(), g.double()
            if per_token:
                a, g, yy = a.reshape(-1, 1, a.shape[-1]), g.reshape(-1, 1, g.shape[-1]), y.reshape(-1)
            else:
                yy = y
            st["count"].index_add_(0, yy, torch.ones(len(yy), dtype=torch.float64))
            st["act_sum"].index_add_(0, yy, a.mean(1))
            st["act_sq"].index_add_(0, yy, a.mean(1) ** 2)
            st["taylor_sum"].index_add_(0, yy, (a * g).sum(1).abs())
        stats_close({layer: prof.stats[layer]}, {layer: st}, keys=["count", "act_sum", "act_sq", "taylor_sum"])


# ---------------------------------------------------------------------------------------------
# bad input: each error names the function, says what was expected and what came, changes nothing

def test_per_token_labels_need_a_channels_last_layer():
    x, y = next(iter(small_loader(8, 8)))
    with pytest.raises(ValueError, match=r"neuslice.profile: (per-token labels|the model output)"):
        neuslice.profile(trained(), [(x, y.view(2, 4).repeat(4, 1)[:8, :4])], K, metrics=("avg",), progress=False)


def test_layer_output_not_batch_first_is_an_error():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 6), nn.Linear(6, K)

        def forward(self, x):                         # x [B, 8, 8] → fc sees [T=8, B, 8]
            return self.head(self.fc(x.squeeze(1).transpose(0, 1)).mean(0))

    x, y = next(iter(small_loader(5, 5)))
    with pytest.raises(ValueError, match=r"neuslice.profile: layer 'fc' .*gave output \[8, 5, 6\]; "
                                         r"expected \[B, \.\.\., N\] = \[5, \.\.\., 6\]"):
        neuslice.profile(SeqFirst(), [(x, y)], K, metrics=("avg",), progress=False)


def test_model_without_sliceable_layer_and_unknown_layer_names():
    head_only = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
    with pytest.raises(ValueError, match=r"neuslice.profile: no sliceable layer: expected at least one Conv1d/2d/3d "
                                         r"or Linear module \(other than the head \['1'\], which only its name selects\)"):
        neuslice.profile(head_only, small_loader(10, 10), K, progress=False)
    with pytest.raises(ValueError, match=r"neuslice.profile: unknown layer name\(s\) \['nope'\]; expected .*"
                                         r"'features.0'"):
        neuslice.profile(trained(), small_loader(10, 10), K, layers=["nope"], progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(metrics=("avgg",)), r"metrics must be a non-empty subset of \('avg', 'var', 'taylor', 'deeplift', "
                              r"'ens'\), got \('avgg',\)"),
    (dict(target="prob"), r"target must be 'logit' or 'loss', got 'prob'"),
    (dict(tap="before"), r"tap must be 'auto' or 'layer', got 'before'"),
    (dict(baseline=torch.zeros(3, 3)), r"baseline must be \[1, 8, 8\] or \[1, 1, 8, 8\]"),
])
def test_bad_arguments(kw, match):
    model = trained()
    with pytest.raises(ValueError, match="neuslice.profile: " + match):
        neuslice.profile(model, small_loader(10, 10), K, progress=False, **kw)
    assert _hooks_of(model) == 0


class _DictTokens(nn.Module):
    """TokenNet (pooled) called with a mapping of inputs, as a model library's model is."""

    def __init__(self):
        super().__init__()
        self.net = _TokenNet(pooled=True)

    def forward(self, input_ids):
        return self.net(input_ids)


def test_a_mapping_baseline_of_other_positions_than_a_batch_is_refused_by_name():
    """A baseline mapping is used as given, so a batch of another length has no reference at its positions: the
    error names the layer and the fix (the op is called without its checks; before, the kernel read the shorter
    reference out of bounds). A batch of the baseline's length is profiled."""
    model = _DictTokens().eval()
    tok, y = _token_data(per_token=False)[0]              # [6, 5] tokens
    base = {"input_ids": torch.zeros(1, 5, dtype=torch.long)}
    p = neuslice.profile(model, [({"input_ids": tok}, y)], 4, metrics=("deeplift",), baseline=base, progress=False)
    assert p.num_batches == 1
    longer = {"input_ids": torch.cat([tok, tok[:, :2]], 1)}
    with pytest.raises(ValueError, match=r"neuslice.profile: layer 'net.ffn\d' \(tapped at 'net.\w+'\) has 7 "
                                         r"positions in this batch and 5 in the baseline's forward.*leave "
                                         r"baseline=None"):
        neuslice.profile(model, [(longer, y)], 4, metrics=("deeplift",), baseline=base, progress=False)

def test_non_finite_batch_names_the_layer(deferred):
    model = trained()
    x, y = next(iter(small_loader(10, 10)))
    x = x.clone()
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(neuslice.NonFiniteError, match=r"neuslice.profile: layer 'features.0' \(tapped at "
                                                      r"'features.2'\).*non-finite.*no statistic changed"):
        neuslice.profile(model, [(x, y)], K, progress=False)
    with pytest.raises(ValueError, match=r"data must yield \(inputs, labels\), \(inputs, labels, mask\) or a "
                                         r"mapping of inputs holding 'labels', got tuple of length 4"):
        neuslice.profile(model, [(x, y, y, y)], K, progress=False)
    with pytest.raises(ValueError, match=r"mask must be \[B, T\] with B = 10 \(the labels' batch size\), got \[10\]"):
        neuslice.profile(model, [(x, y, y)], K, progress=False)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor \(class indices\), got torch.float32"):
        neuslice.profile(model, [(x, y.float())], K, progress=False)


class _HFLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return self.model(**kw).logits


@pytest.mark.filterwarnings("ignore:.*tapped at their own output")   # the untraceable encoder's tap warning
def test_rescale_buffers_reused_across_batches_and_shapes_give_the_fresh_tensor_multipliers(monkeypatch):
    """Rescale's ratio buffers are kept from batch to batch (reallocated when a batch's shape changes) and
    take the multiplier in place: the profile equals, bit for bit, one whose ratios are fresh tensors each batch, on a BERT-like encoder (its
    FFN's GELU as nn.GELU, so the rule applies) over batches of changing size and length."""
    pytest.importorskip("transformers")
    import hf_models
    from neuslice.engine import deeplift
    model, batch = hf_models.bert()
    for m in list(model.modules()):
        for name, c in list(m.named_children()):
            if type(c).__name__ == "GELUActivation":
                setattr(m, name, nn.GELU())
    model = _HFLogits(model).eval()
    g = torch.Generator().manual_seed(0)
    data = [(batch(b, t, seed=i), torch.randint(0, 3, (b,), generator=g))
            for i, (b, t) in enumerate([(4, 8), (4, 8), (3, 8), (4, 6), (4, 8)])]
    got = neuslice.profile(model, data, 3, metrics=("deeplift",), progress=False)
    assert got.deeplift == "rescale"

    def fresh(inp, out, ref_in, ref_out, ratio, off, scratch):
        d = inp - ref_in
        use = d.abs() > deeplift.EPS
        return (out - ref_out) / torch.where(use, d, torch.ones_like(d)), ~use
    monkeypatch.setattr(deeplift, "_ratio", fresh)
    want = neuslice.profile(model, data, 3, metrics=("deeplift",), progress=False)
    for name in want.layer_names:
        torch.testing.assert_close(got.stats[name]["deeplift_sum"], want.stats[name]["deeplift_sum"], rtol=0, atol=0)


class _Untraceable(nn.Module):
    """Linear-ReLU-head with data-dependent control flow: torch.fx cannot trace it, so profile probes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.act, self.head = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.head(h if float(h.detach().sum()) >= 0 else -h)


def test_the_probe_of_an_untraceable_model_runs_two_samples():
    model = _Untraceable().eval()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    prof = neuslice.profile(model, data, 3, metrics=("avg", "taylor"), progress=False)
    assert prof.layer_names == ["fc"] and prof.num_batches == 2
    assert seen == [2, 16, 16]          # the probe forward, then the two batches


def test_deferred_status_profiles_the_same(monkeypatch):
    """The engine's deferred path (status words, as on a GPU) gives the same profile as the raising one."""
    from neuslice.engine.capture import StatusWords
    model = trained()
    loader = list(small_loader(60, 20))
    plain = neuslice.profile(model, loader, K, metrics=("ens",), progress=False)
    monkeypatch.setattr(StatusWords, "DEFERRED", ("cuda", "cpu"))
    deferred = neuslice.profile(model, loader, K, metrics=("ens",), progress=False)
    stats_close(deferred.stats, plain.stats, rtol=0, atol=0)


def test_profile_lets_go_of_its_tensors_when_it_returns():
    """profile's run objects reference one another (hooks call their methods): its taps, the padded batches'
    reference rows and Rescale's buffers must be released when it returns, not when Python's cyclic collector
    happens to run (on the padded MiniLM-config bench they were 0.8 GB per call, and memory grew call by call)."""
    pytest.importorskip("transformers")
    import gc

    import hf_models as hf
    model, batch = hf.bert()
    for m in model.modules():          # Rescale needs module nonlinearities (transformers' GELUActivation is not)
        for name, child in m.named_children():
            if type(child).__name__ == "GELUActivation":
                setattr(m, name, torch.nn.GELU())
    data = [(batch(8, 12, pad=4, seed=s), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])) for s in range(2)]
    # Twice: garbage that the first collection's callbacks release (a model compiled by an earlier test, held by
    # torch.compile's caches until then) is collected by the second, not counted against this call
    gc.collect()
    gc.collect()
    gc.disable()
    try:
        neuslice.profile(model, data, hf.CLASSES, metrics=("ens",), progress=False)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = sum(o.numel() * o.element_size() for o in gc.garbage if isinstance(o, torch.Tensor))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    one_tap = 8 * 12 * hf.FFN * 4                     # bytes of one FFN tap of one batch
    assert held < one_tap, f"{held} bytes of tensors were left for the cyclic collector"


def test_a_collators_mapping_batch_gives_its_labels_and_the_rest_as_inputs():
    """Hugging Face collators yield one mapping per batch, labels included: profile takes ``labels`` from it and
    gives the model the other entries, as for ``(inputs, labels)``; a mapping without labels is refused by name."""
    pytest.importorskip("transformers")
    import hf_models as hf
    model, batch = hf.bert()
    pairs = [(batch(6, 7, pad=2, seed=i), torch.arange(6) % hf.CLASSES) for i in range(2)]
    want = neuslice.profile(model, pairs, hf.CLASSES, progress=False)
    got = neuslice.profile(model, [{**x, "labels": y} for x, y in pairs], hf.CLASSES, progress=False)
    stats_close(got.stats, want.stats, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"a mapping of inputs holding 'labels', got dict of length 2 with keys "
                                         r"\['attention_mask', 'input_ids'\] and no 'labels'"):
        neuslice.profile(model, [x for x, _ in pairs], hf.CLASSES, progress=False)
