"""neuslice.Profiler inside a training loop: same statistics as profile(target="loss"), gradients untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import neuslice
import neuslice.models as M
from helpers import TokenNet, WideHead, spread_labels, token_data
from slicing_fixtures import F32, loaders, small_loader, stats_close, trained
from tolerances import ACCUMULATE, AUTOCAST_BF16, assert_normwise_close, tol

K = 10
F64 = tol(ACCUMULATE, torch.float64)


def _hooks_of(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_profiler_equals_offline_profile_with_loss_target():
    model = trained()                                  # eval mode, no optimizer step: weights stay fixed
    loader = small_loader(90, 30)
    with neuslice.Profiler(model, K, metrics=("avg", "var", "taylor", "deeplift")) as prof:
        for x, y in loader:
            with prof.batch(y):
                F.cross_entropy(model(x), y, reduction="sum").backward()
    got = prof.profile()
    assert got.target == "loss" and got.deeplift == "gradient" and got.num_batches == 3
    want = neuslice.profile(model, loader, K, metrics=("avg", "var", "taylor"), target="loss", progress=False)
    stats_close(got.stats, want.stats, keys=["count", "act_sum", "act_sq", "taylor_sum"])
    # gradient × Δ with a zero reference and no baseline: deeplift is taylor
    stats_close(got.stats, {n: {"deeplift_sum": s["taylor_sum"]} for n, s in got.stats.items()},
                keys=["deeplift_sum"], rtol=0, atol=0)
    assert _hooks_of(model) == 0


class _Twice(torch.nn.Module):
    """``shared`` (Linear 16→16, ReLU) runs twice per forward, on inputs of B rows and of [B, 3] positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.fc0, self.shared, self.act = torch.nn.Linear(64, 16), torch.nn.Linear(16, 16), torch.nn.ReLU()
        self.head = torch.nn.Linear(16, K)

    def forward(self, x):
        h = self.act(self.fc0(x.flatten(1)))
        a = self.act(self.shared(h))                                    # [B, 16]: one position
        b = self.act(self.shared(h.unsqueeze(1) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1)))  # [B, 3, 16]
        return self.head(a + b.mean(1))


@pytest.mark.parametrize("metrics", [("avg", "var", "taylor", "deeplift"), ("avg", "var")])
def test_profiler_equals_offline_profile_for_a_layer_called_twice(metrics):
    model = _Twice().eval()
    loader = small_loader(60, 30)
    base = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with neuslice.Profiler(model, K, metrics=metrics, baseline=base) as prof:
        for x, y in loader:
            with prof.batch(y):
                F.cross_entropy(model(x), y, reduction="sum").backward()
    got = prof.profile()
    assert got.layer_names == ["fc0", "shared"]
    want = neuslice.profile(model, loader, K, metrics=metrics, target="loss", baseline=base, progress=False)
    keys = ["count", "act_sum", "act_sq"] + (["taylor_sum"] if "taylor" in metrics else [])
    stats_close(got.stats, want.stats, keys=keys)
    # the 4 positions of shared (1 + 3) by hand: x̄ is their mean
    x, y = next(iter(loader))
    with torch.no_grad():
        h = model.act(model.fc0(x.flatten(1).double().float()))
        a = model.act(model.shared(h)).double()
        b = model.act(model.shared(h.unsqueeze(1) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1))).double()
    xbar = torch.cat([a.unsqueeze(1), b], 1).mean(1)
    first = neuslice.profile(model, [(x, y)], K, metrics=("avg",), progress=False)
    torch.testing.assert_close(first.stats["shared"]["act_sum"],
                               torch.zeros(K, 16, dtype=torch.float64).index_add_(0, y, xbar), **F32)
    assert _hooks_of(model) == 0


def _train(with_profiler: bool, steps: int = 6):
    torch.manual_seed(0)
    model = M.build("digits_cnn", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    prof = neuslice.Profiler(model, K) if with_profiler else None
    grads = []
    for i, (x, y) in zip(range(steps), loaders()[0]):
        opt.zero_grad()
        if prof is not None:
            with prof.batch(y):
                F.cross_entropy(model(x), y).backward()
        else:
            F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    if prof is not None:
        prof.close()
    return model, grads, prof


def test_profiler_never_alters_training():
    m0, g0, _ = _train(False)
    m1, g1, prof = _train(True)
    for a, b in zip(g0, g1):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for (k, v), w in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.equal(v, w), k
    p = prof.profile()
    assert p.num_batches == 6 and float(p.counts.sum()) == 6 * 64


def test_only_batch_blocks_are_profiled_and_misuse_is_reported():
    model = trained()
    x, y = next(iter(small_loader(20, 20)))
    prof = neuslice.Profiler(model, K)
    F.cross_entropy(model(x), y).backward()            # outside a block: ignored
    assert prof.num_batches == 0
    with pytest.raises(neuslice.NeusliceError, match=r"Profiler.batch: no gradient reached layer 'features.0'.*"
                                                     r"call loss.backward\(\) inside the block"):
        with prof.batch(y):
            model(x)
    with pytest.raises(neuslice.NeusliceError, match=r"layer 'features.0' was not tapped"):
        with prof.batch(y):
            pass
    with pytest.raises(ValueError, match=r"neuslice.Profiler.batch: labels must lie in \[0, 10\).*got label -1"):
        prof.batch(y - 1)
    with pytest.raises(ValueError, match=r"Profiler.batch: layer 'features.0' .*expected \[B, N, \.\.\.\] = \[7,"):
        with prof.batch(y[:7]):
            F.cross_entropy(model(x), y).backward()
    with prof.batch(y):
        with pytest.raises(RuntimeError, match="batches do not nest"):
            prof.batch(y)
        F.cross_entropy(model(x), y).backward()
    assert prof.num_batches == 1
    prof.close()
    assert _hooks_of(model) == 0
    with pytest.raises(RuntimeError, match="the profiler is closed"):
        prof.batch(y)


def test_non_finite_batch_changes_nothing(deferred):
    model = trained()
    x, y = next(iter(small_loader(20, 20)))
    prof = neuslice.Profiler(model, K)
    with prof.batch(y):
        F.cross_entropy(model(x), y).backward()
    before = {n: {s: v.clone() for s, v in st.items()} for n, st in prof.totals.items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(neuslice.NonFiniteError, match=r"layer 'features.0' \(tapped at 'features.2'\)"):
        with prof.batch(y):
            F.cross_entropy(model(bad), y).backward()
    stats_close(prof.totals, before, rtol=0, atol=0)
    assert prof.num_batches == 1
    skip = neuslice.Profiler(model, K, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="skipped; 1 batch"):
        with skip.batch(y):
            F.cross_entropy(model(bad), y).backward()
    assert skip.skipped == 1 and skip.num_batches == 0
    prof.close()
    skip.close()


def _profiled(model, data, k, metrics=("avg", "var", "taylor", "deeplift"), skip=False):
    with neuslice.Profiler(model, k, metrics=metrics, on_nonfinite="skip" if skip else "raise") as prof:
        for x, y in data:
            with prof.batch(y):
                out = model(x)
                F.cross_entropy(out.reshape(-1, k), y.reshape(-1), reduction="sum").backward()
    return prof.profile()


@pytest.mark.parametrize("k, per_token", [(3, False), (500, False), (4, True), (300, True)])
def test_batch_buffers_hold_the_classes_present_and_give_the_full_buffers_numbers(k, per_token, monkeypatch):
    """Only the classes present get batch buffer rows; the totals are the ones [K, N] buffers gave, to the bit."""
    from neuslice.engine import profiler as online
    if per_token:
        model = TokenNet(pooled=False)
        model.head = torch.nn.Linear(8, k)
        data = [(tok, y if k == 4 else y * 70 + 9) for tok, y in token_data(per_token=True)]
    else:
        (x, y), = small_loader(60, 60)
        model, y = WideHead(k), spread_labels(y, k)
        data = [(x[:25], y[:25]), (x[25:], y[25:])]
    rows = []
    real = neuslice.ops.accumulate_trusted_
    monkeypatch.setattr(neuslice.ops, "accumulate_trusted_", lambda *a: (rows.append(a[5].shape[0]), real(*a))[1])
    new = _profiled(model, data, k)
    assert rows == [len(y.unique()) for _, y in data for _ in range(2)]
    assert int((new.counts > 0).sum()) == min(k, 4 if per_token else 10)
    monkeypatch.setattr(online, "present_classes", lambda y, ignore_index=-100: (torch.arange(k, device=y.device), y))
    stats_close(new.stats, _profiled(model, data, k).stats, rtol=0, atol=0)


def test_a_batch_non_finite_in_its_second_layer_changes_no_total(deferred):
    """All or nothing: the first layer's sums of a skipped batch never reach the totals."""
    (x, y), = small_loader(60, 60)
    model, y = WideHead(500), spread_labels(y, 500)
    good = _profiled(model, [(x[:25], y[:25])], 500, metrics=("avg", "var"))
    poisoned = WideHead(500)
    real = poisoned.forward
    poisoned.forward = lambda x: (setattr(poisoned, "poison", len(x) == 35), real(x))[1]
    with pytest.warns(UserWarning, match=r"layer 'fc2'.*skipped; 1 batch"):
        both = _profiled(poisoned, [(x[:25], y[:25]), (x[25:], y[25:])], 500, metrics=("avg", "var"), skip=True)
    assert both.num_batches == 1
    stats_close(both.stats, good.stats, rtol=0, atol=0)


def test_deeplift_with_a_baseline_is_gradient_times_delta():
    model = trained()
    loader = small_loader(60, 30)
    base = torch.zeros(1, 1, 8, 8)
    with neuslice.Profiler(model, K, metrics=("taylor", "deeplift"), baseline=base) as prof:
        for x, y in loader:
            with prof.batch(y):
                F.cross_entropy(model(x), y, reduction="sum").backward()
    got = prof.profile().stats
    mods = dict(model.named_modules())
    for layer, tap in (("features.0", "features.2"), ("features.4", "features.6")):
        seen = []
        h = mods[tap].register_forward_hook(lambda m, a, o: seen.append(o))
        with torch.no_grad():
            model(base)
        r = seen.pop()[0].double()
        want = torch.zeros(K, r.shape[0], dtype=torch.float64)
        for x, y in loader:
            out = model(x)
            a = seen.pop()
            g = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), a)[0].double()
            want.index_add_(0, y, ((a.detach().double() - r) * g).sum((2, 3)).abs())
        h.remove()
        torch.testing.assert_close(got[layer]["deeplift_sum"], want, **F32)
        assert not torch.allclose(got[layer]["deeplift_sum"], got[layer]["taylor_sum"])
    with pytest.raises(ValueError, match=r"neuslice.Profiler: baseline must be one input as a batch of one, "
                                         r"\[1, \.\.\.\], got \[8, 8\]"):
        neuslice.Profiler(model, K, metrics=("deeplift",), baseline=torch.zeros(8, 8))



def test_a_baseline_of_other_positions_than_the_batch_is_refused_by_name():
    """The Profiler's baseline is one forward: a batch whose taps have another number of positions has no
    reference there. Refused with the layer named, the batch not counted, nothing read out of bounds."""
    model = TokenNet(pooled=True).eval()
    tok, y = token_data(per_token=False)[0]
    with neuslice.Profiler(model, 4, metrics=("deeplift",), baseline=torch.zeros(1, 5, dtype=torch.long)) as prof:
        with prof.batch(y):
            F.cross_entropy(model(tok), y).backward()
        with pytest.raises(ValueError, match=r"layer 'ffn2' \(tapped at 'ffn2'\) has 7 positions in this batch and "
                                             r"5 in the baseline's forward.*pad the baseline and the batches"):
            with prof.batch(y):
                F.cross_entropy(model(torch.cat([tok, tok[:, :2]], 1)), y).backward()
    assert prof.profile().num_batches == 1

def test_per_token_labels_in_a_training_loop():
    model = TokenNet(pooled=False).eval()
    data = token_data(per_token=True)
    with neuslice.Profiler(model, 4) as prof:
        for tok, y in data:
            with prof.batch(y):
                out = model(tok)
                F.cross_entropy(out.reshape(-1, 4), y.reshape(-1), reduction="sum").backward()
    want = neuslice.profile(model, data, 4, metrics=("avg", "var", "taylor"), target="loss", progress=False)
    assert float(prof.profile().counts.sum()) == 12 * 5
    stats_close(prof.profile().stats, want.stats, keys=["count", "act_sum", "act_sq", "taylor_sum"])


# -- training loops as users write them (docs/method.md §1, §2) ------------------------------------------------
class _Encoder(torch.nn.Module):
    """An encoder whose default pooler runs in forward, but whose output the classifier below ignores."""

    def __init__(self):
        super().__init__()
        self.fc0, self.act = torch.nn.Linear(64, 16), torch.nn.ReLU()
        self.pooler, self.pool_act = torch.nn.Linear(16, 16), torch.nn.Tanh()

    def forward(self, x):
        h = self.act(self.fc0(x.flatten(1)))
        return h, self.pool_act(self.pooler(h))


class _Classifier(torch.nn.Module):
    def __init__(self, untraceable=False):
        super().__init__()
        torch.manual_seed(3)
        self.encoder, self.spare, self.head = _Encoder(), torch.nn.Linear(16, 16), torch.nn.Linear(16, K)
        self.untraceable = untraceable

    def forward(self, x):
        if self.untraceable and bool(x.sum() > -1e30):           # data-dependent: fx cannot trace it
            x = x + 0
        hidden, _pooled = self.encoder(x)
        return self.head(hidden)


@pytest.mark.parametrize("untraceable", [False, True])
def test_unused_layers_are_excluded_with_one_warning(untraceable):
    model, loader = _Classifier(untraceable).eval(), small_loader(60, 30)
    with pytest.warns(UserWarning, match=r"unused layer\(s\) are excluded and not in the profile") as rec:
        with neuslice.Profiler(model, K, metrics=("avg", "var", "taylor")) as prof:
            for x, y in loader:
                with prof.batch(y):
                    F.cross_entropy(model(x), y, reduction="sum").backward()
    unused = [str(w.message) for w in rec if "unused layer" in str(w.message)]
    assert len(unused) == 1, unused
    assert "never called in forward: ['spare']" in unused[0]
    assert "no gradient reaches them: ['encoder.pooler']" in unused[0]
    got = prof.profile()
    assert got.layer_names == ["encoder.fc0"] and got.num_batches == 2
    with pytest.warns(UserWarning, match=r"unused layer.*\['spare'\].*\['encoder.pooler'\]") as rec:
        want = neuslice.profile(model, loader, K, metrics=("avg", "var", "taylor"), target="loss", progress=False)
    assert len([w for w in rec if "unused layer" in str(w.message)]) == 1
    assert want.layer_names == ["encoder.fc0"]
    stats_close(got.stats, want.stats, keys=["count", "act_sum", "act_sq", "taylor_sum"])
    # named explicitly, an unused layer is an error naming it
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match=r"\['encoder.pooler'\] were named in layers= but no gradient reaches"):
        neuslice.profile(model, [(x, y)], K, layers=["encoder.fc0", "encoder.pooler"], progress=False)
    with neuslice.Profiler(model, K, layers=["encoder.fc0", "encoder.pooler"]) as prof:
        with pytest.raises(ValueError, match=r"\['encoder.pooler'\] were named in layers= but no gradient"):
            with prof.batch(y):
                F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"layer\(s\) \['spare'\] are never called in forward \(unused\)"):
        neuslice.profile(model, [(x, y)], K, layers=["spare"], progress=False)
    assert _hooks_of(model) == 0


class _Checkpointed(torch.nn.Module):
    """Two blocks; ``mode`` None runs them plainly, else through torch.utils.checkpoint (reentrant or not)."""

    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(4)
        self.fc0, self.act0 = torch.nn.Linear(64, 16), torch.nn.ReLU()
        self.fc1, self.act1 = torch.nn.Linear(16, 16), torch.nn.GELU()
        self.fc2, self.act2 = torch.nn.Linear(16, 16), torch.nn.ReLU()
        self.head = torch.nn.Linear(16, K)
        self.mode = mode

    def block(self, h):
        return self.act2(self.fc2(self.act1(self.fc1(h))))

    def forward(self, x):
        h = self.act0(self.fc0(x.flatten(1)))
        if self.mode is None:
            return self.head(self.block(h))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.mode == "reentrant"))


def _loop(model, loader, metrics=("avg", "var", "taylor")):
    with neuslice.Profiler(model, K, metrics=metrics) as prof:
        for x, y in loader:
            with prof.batch(y):
                F.cross_entropy(model(x), y, reduction="sum").backward()
    assert _hooks_of(model) == 0
    return prof.profile()


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")   # torch's, in profile's no-grad forward
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_gradient_checkpointing_counts_each_block_once(mode):
    loader = [(x.double(), y) for x, y in small_loader(60, 30)]
    want = _loop(_Checkpointed(None).double().train(), loader)
    got = _loop(_Checkpointed(mode).double().train(), loader)
    assert got.layer_names == want.layer_names == ["fc0", "fc1", "fc2"] and got.num_batches == 2
    stats_close(got.stats, want.stats, **F64)
    if mode == "non-reentrant":                      # offline too, DeepLIFT's Rescale included
        kw = dict(metrics=("avg", "var", "taylor", "deeplift"), progress=False)
        stats_close(neuslice.profile(_Checkpointed(mode).double(), loader, K, **kw).stats,
                    neuslice.profile(_Checkpointed(None).double(), loader, K, **kw).stats, **F64)
    else:                                            # torch runs it only under .backward(): said so
        with pytest.raises(RuntimeError, match=r"reentrant gradient checkpointing.*use_reentrant=False"):
            neuslice.profile(_Checkpointed(mode).double(), loader, K, progress=False)


def test_autocast_bf16_accumulates_in_float32_and_float64(monkeypatch):
    model, loader = trained(), small_loader(120, 40)
    seen = []
    real = neuslice.ops.accumulate_trusted_

    def spy(x, g, *args):
        seen.append((x.dtype, None if g is None else g.dtype, args[3].dtype))     # args[3]: count
        return real(x, g, *args)

    def loop(autocast):
        with neuslice.Profiler(model, K) as prof:
            for x, y in loader:
                with prof.batch(y), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    F.cross_entropy(model(x).float(), y, reduction="sum").backward()
        return prof.profile()

    monkeypatch.setattr(neuslice.ops, "accumulate_trusted_", spy)
    got = loop(True)
    assert seen and all(s == (torch.bfloat16, torch.bfloat16, torch.float32) for s in seen), set(seen)
    monkeypatch.undo()
    want = loop(False)
    for n in want.layer_names:
        for s, tol_ in AUTOCAST_BF16.items():
            assert got.stats[n][s].dtype == torch.float64
            assert_normwise_close(got.stats[n][s], want.stats[n][s], tol_, f"{n}/{s}")


@pytest.mark.parametrize("mask_from", ["attention_mask", "mask="])
def test_profiler_reads_no_tensor_values_during_the_backward(monkeypatch, mask_from):
    """On a GPU every host read of tensor values waits for the device, and one inside the backward's hooks
    leaves the device idle while the host catches up (docs/architecture.md, "Deferred status"). The engine reads
    a batch's labels and mask once, before the forward (host copies: capture.host_copy), and its status words once,
    after the backward. Checked on the CPU with the status words deferred as on a GPU: every read of tensor
    values made by code in neuslice/engine, by phase."""
    pytest.importorskip("transformers")
    import sys

    import hf_models as hf
    from neuslice.engine.capture import StatusWords
    from neuslice.engine.hooks import in_backward
    monkeypatch.setattr(StatusWords, "DEFERRED", ("cuda", "cpu"))
    model, batch = hf.bert()
    model.train()
    x, y = batch(6, 8, pad=3), torch.tensor([0, 1, 2, 0, 1, -100])
    mask = x["attention_mask"].bool() if mask_from == "mask=" else None
    reads = []

    def spy(name, real):
        def read(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/neuslice/engine/" in caller:
                reads.append((name, "backward" if in_backward() else "outside"))
            return real(*args, **kwargs)
        return read
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    for name in ("unique", "nonzero", "masked_select"):
        monkeypatch.setattr(torch, name, spy(name, getattr(torch, name)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with neuslice.Profiler(model, hf.CLASSES, metrics=("avg", "var", "taylor")) as prof:
        for _ in range(2):                      # the first batch probes the model; the second is a plain step
            reads.clear()
            with prof.batch(y, mask=mask):
                loss = F.cross_entropy(model(**x).logits, y)
                loss.backward()
            opt.step()
            opt.zero_grad()
    assert [r for r in reads if r[1] == "backward"] == []
    assert any(r[0] == "tolist" for r in reads)         # (the spy sees the reads that remain: labels, status)
    assert prof.profile().stats["bert.encoder.layer.0.intermediate.dense"]["count"].sum() == 10   # 5 labelled samples, 2 batches


@pytest.mark.slow                                    # dynamo's tracing: about 9 and 16 s
@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_a_compiled_model_profiles_as_the_bare_model_and_its_hooks_are_never_compiled(how):
    """torch.compile(model) and model.compile(): the profile's layer names carry no ``_orig_mod.`` prefix (as
    without compile, so slices fit the bare model), the statistics are eager mode's, and dynamo never compiles
    the engine's hooks (before, it compiled the tap hook once per layer up to its recompile limit, then warned)."""
    pytest.importorskip("transformers")
    import torch._dynamo as dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    import hf_models as hf
    from neuslice.engine import hooks
    from neuslice.engine.profiler import Profiler, _Batch

    def run(compiled):
        model, batch = hf.bert()
        model.train()
        m = model
        if compiled and how == "torch.compile":
            m = torch.compile(model, backend="eager")
        elif compiled:
            model.compile(backend="eager")
        with neuslice.Profiler(m, hf.CLASSES, metrics=("avg", "var", "taylor")) as prof:
            for i in range(3):
                x, y = batch(6, 7, pad=2, seed=i), torch.arange(6) % hf.CLASSES
                with prof.batch(y):
                    F.cross_entropy(m(**x).logits, y, reduction="sum").backward()
        return prof.profile()

    dynamo.reset()
    try:
        want, got = run(False), run(True)
        engine = [_Batch.on_tap, _Batch._finish, Profiler._on_forward, hooks.ChainHooks._watched]
        compiled = [f.__qualname__ for f in engine if _debug_get_cache_entry_list(f.__code__)]
    finally:
        dynamo.reset()
    assert got.layer_names == want.layer_names and not any(n.startswith("_orig_mod") for n in got.layer_names)
    stats_close(got.stats, want.stats, **F64)
    assert compiled == []


@pytest.mark.slow                                    # dynamo's tracing
def test_hooks_added_after_compiling_apply_slices_or_say_why_they_cannot():
    """Code compiled before a hook was added does not run it (dynamo does not guard on module hooks). Slices.apply
    on a model compiled in place runs it eagerly inside the block (before: the masks were silently ignored);
    apply on torch.compile's wrapper, and a Profiler attached after the first compiled call, say what to do."""
    pytest.importorskip("transformers")
    import torch._dynamo as dynamo

    import hf_models as hf
    model, batch = hf.bert()
    data = [(batch(6, 7, pad=2, seed=i), torch.arange(6) % hf.CLASSES) for i in range(2)]
    x, y = data[0]
    s = neuslice.semantic_slice(neuslice.profile(model, data, hf.CLASSES, progress=False), "taylor", 0.5)
    dynamo.reset()
    try:
        with torch.no_grad():
            plain = model(**x).logits
            with s.apply(model, [0, 2]) as m:
                want = m(**x).logits
            assert not torch.allclose(want, plain)
            model.compile(backend="eager")
            model(**x)                                   # compiled without the mask hooks
            impl = model._compiled_call_impl
            with s.apply(model, [0, 2]) as m:
                got = m(**x).logits
            torch.testing.assert_close(got, want)
            assert model._compiled_call_impl is impl
            torch.testing.assert_close(model(**x).logits, plain)
        wrapped, _ = hf.bert()
        compiled = torch.compile(wrapped, backend="eager")
        with pytest.raises(neuslice.SignatureError, match=r"model is torch.compile's wrapper of the model the file "
                                                          r"was made for: pass the model you compiled"):
            s.apply(compiled, [0, 2])
        model.train()
        F.cross_entropy(model(**x).logits, y).backward()          # compiled in train mode, without Profiler hooks
        with pytest.raises(neuslice.NeusliceError, match=r"The model is compiled, and code compiled before the "
                                                         r"Profiler was attached does not run its hooks"):
            with neuslice.Profiler(model, hf.CLASSES, metrics=("avg", "taylor")) as prof:
                with prof.batch(y):
                    F.cross_entropy(model(**x).logits, y).backward()
    finally:
        dynamo.reset()


@pytest.mark.slow                                    # a fresh interpreter and dynamo's tracing
def test_a_profiler_attached_before_compiling_wraps_its_hooks_once_dynamo_is_imported():
    """Wrapping a hook for torch.compile imports dynamo (1.1 s), so the engine wraps only once it is imported: a
    process that never compiles does not pay for it (profile, apply), and a Profiler attached before
    torch.compile (dynamo not yet imported) wraps its hooks at the next batch, before the first compiled call
    can trace them. In a fresh interpreter, where nothing imported dynamo yet (building a Hugging Face model
    does: a plain model here)."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        from torch import nn
        import neuslice
        from neuslice.engine.profiler import _Batch
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        x, y = torch.randn(6, 8), torch.arange(6) % 3
        s = neuslice.semantic_slice(neuslice.profile(model, [(x, y)], 3, progress=False), "taylor", 0.5)
        with s.apply(model, [0, 2]) as m:
            m(x)
        assert "torch._dynamo" not in sys.modules, "profile or apply imported dynamo"
        prof = neuslice.Profiler(model, 3, metrics=("avg", "taylor"))
        assert "torch._dynamo" not in sys.modules, "the Profiler imported dynamo"
        cm = torch.compile(model, backend="eager")
        for i in range(2):
            with prof.batch(y):
                F.cross_entropy(cm(torch.randn(6, 8)), y).backward()
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        assert not _debug_get_cache_entry_list(_Batch.on_tap.__code__), "the tap hook was compiled"
        assert prof.profile().num_batches == 2
        print("ok")
    """)
    tests = Path(__file__).parent
    r = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(tests)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
