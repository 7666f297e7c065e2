"""Positions that do not count (docs/method.md §2): padding (attention_mask, or an explicit mask) and labels equal to
ignore_index, in profile and Profiler, on the tiny Hugging Face models of tests/hf_models.py and on plain models."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import neuslice
from helpers import TokenNet, WideHead
from tolerances import ACCUMULATE, tol

K = 3
F64 = tol(ACCUMULATE, torch.float64)


def _hf(arch, token=False):
    pytest.importorskip("transformers")
    import hf_models as hf
    model, _ = hf.bert(token=True) if token else hf.ARCHITECTURES[arch]()
    if arch == "gpt2":
        neuslice.conv1d_to_linear(model)
    return model.double(), hf.VOCAB


LENGTHS, T = (5, 8, 3, 8, 6, 4), 10


def _sequences(vocab, per_token=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]
    if per_token:                                     # a few tokens labelled -100 (not counted) in every sequence
        ys = [torch.where(torch.rand(n, generator=g) < 0.3, -100, torch.randint(0, K, (n,), generator=g))
              for n in LENGTHS]
    else:
        ys = list(torch.randint(0, K, (len(LENGTHS),), generator=g))
    return seqs, ys


def _padded(seqs, ys, per_token=False, bs=3):
    """Right-padded to T with attention_mask; per-token labels of padding are -100 (the HF convention)."""
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    am = torch.zeros_like(ids)
    y = torch.full((len(seqs), T), -100) if per_token else torch.stack(ys)
    for i, (s, yy) in enumerate(zip(seqs, ys)):
        ids[i, :len(s)], am[i, :len(s)] = s, 1
        if per_token:
            y[i, :len(s)] = yy
    return [({"input_ids": ids[i:i + bs], "attention_mask": am[i:i + bs]}, y[i:i + bs])
            for i in range(0, len(seqs), bs)]


def _bucketed(seqs, ys):
    """The same sequences grouped by length: no padding at all."""
    by_len = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    return [({"input_ids": torch.stack([seqs[i] for i in idx]), "attention_mask": torch.ones(len(idx), n,
                                                                                              dtype=torch.long)},
             torch.stack([ys[i] for i in idx])) for n, idx in by_len.items()]


def _same(a, b, stats=None):
    assert set(a.layer_names) <= set(b.layer_names) or set(b.layer_names) <= set(a.layer_names)
    common = [n for n in a.layer_names if n in b.layer_names]
    assert common
    for n in common:
        for s in stats or a.statistics:
            torch.testing.assert_close(a.stats[n][s], b.stats[n][s], **F64, msg=lambda m, n=n, s=s: f"{n}/{s}: {m}")


# ---------------------------------------------------------------------------------------------
# padding invariance: bucketed by length vs padded to a common length with attention_mask

@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_padding_changes_no_statistic(arch):
    """Every statistic of every layer equal, DeepLIFT's included: a padded sample's reference is the baseline
    padded as the sample is (docs/method.md §2, Reference r), so on the bidirectional encoder too its reference
    activations at the valid positions are those of the unpadded sequence."""
    model, vocab = _hf(arch)
    seqs, ys = _sequences(vocab)
    metrics = ("avg", "var", "taylor", "deeplift")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # untraceable: taps by module order (warned elsewhere)
        padded = neuslice.profile(model, _padded(seqs, ys), K, metrics=metrics, progress=False)
        bucketed = neuslice.profile(model, _bucketed(seqs, ys), K, metrics=metrics, progress=False)
        # without the mask, padding leaks into the statistics: the test can fail
        leaky = [({"input_ids": x["input_ids"]}, y) for x, y in _padded(seqs, ys)]
        leaked = neuslice.profile(model, leaky, K, metrics=("avg",), progress=False)
    assert float(padded.counts.sum()) == len(LENGTHS)
    _same(padded, bucketed)
    n = padded.layer_names[0]
    assert not torch.allclose(leaked.stats[n]["act_sum"], bucketed.stats[n]["act_sum"], **F64)


def test_padding_changes_no_statistic_through_a_functional_nonlinearity():
    """DistilBERT's classifier runs ``nn.ReLU()(pre_classifier(x))``, a ReLU that is no module of the model: the
    Rescale rule reaches it through the tap hooks, with each padded sample's reference row (docs/method.md §2)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=48, num_labels=K, dropout=0.0,
                              attention_dropout=0.0, seq_classif_dropout=0.0)
    model = tf.DistilBertForSequenceClassification(cfg).eval().double()
    seqs, ys = _sequences(96)
    metrics = ("avg", "var", "taylor", "deeplift")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        padded = neuslice.profile(model, _padded(seqs, ys), K, metrics=metrics, progress=False)
    bucketed = neuslice.profile(model, _bucketed(seqs, ys), K, metrics=metrics, progress=False)
    entry = next(e for e in padded.layers if e["name"] == "pre_classifier")
    assert entry["tap"] == "relu(pre_classifier)" and padded.deeplift == "rescale"
    _same(padded, bucketed)


def test_per_token_labels_padding_changes_no_statistic():
    """Per-token labels on the encoder: each token's DeepLIFT reference is its sequence's, padded as it is."""
    model, vocab = _hf("bert", token=True)
    seqs, ys = _sequences(vocab, per_token=True)
    metrics = ("avg", "var", "taylor", "deeplift")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = neuslice.profile(model, _padded(seqs, ys, per_token=True), K, metrics=metrics, progress=False)
        bucketed = neuslice.profile(model, _bucketed(seqs, ys), K, metrics=metrics, progress=False)
    assert padded.deeplift == "rescale"
    _same(padded, bucketed)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_profiler_padding_changes_no_statistic(arch):
    """Profiler reads the attention_mask the forward receives (by name) and gives the bucketed statistics."""
    model, vocab = _hf(arch)
    seqs, ys = _sequences(vocab)

    def run(batches):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with neuslice.Profiler(model, K, metrics=("avg", "var", "taylor")) as prof:
                for x, y in batches:
                    with prof.batch(y):
                        F.cross_entropy(model(**x).logits, y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
        return prof.profile()

    _same(run(_padded(seqs, ys)), run(_bucketed(seqs, ys)))


class _Features(torch.nn.Module):
    """A wrapper taking the tokenizer's output as one mapping argument, as sentence-transformers' models do
    (``model(features)`` / ``model(features=...)``): the attention mask is nested in the inputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, features):
        return self.inner(**features).logits


def _nest(batches):
    return [({"features": x}, y) for x, y in batches]


def test_padding_changes_no_statistic_when_the_attention_mask_is_nested_in_the_inputs():
    """profile and Profiler find the attention_mask of a mapping nested in the inputs: every statistic, DeepLIFT's
    reference padded as each sample included, equals the bucketed one; before, the padding counted unseen."""
    model, vocab = _hf("bert")
    wrapped = _Features(model)
    seqs, ys = _sequences(vocab)
    metrics = ("avg", "var", "taylor", "deeplift")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = neuslice.profile(wrapped, _nest(_padded(seqs, ys)), K, metrics=metrics, progress=False)
        bucketed = neuslice.profile(model, _bucketed(seqs, ys), K, metrics=metrics, progress=False)
        with neuslice.Profiler(wrapped, K, metrics=("avg", "var", "taylor")) as prof:
            for x, y in _nest(_padded(seqs, ys)):
                with prof.batch(y):
                    F.cross_entropy(wrapped(x["features"]), y, reduction="sum").backward()   # by position
        with neuslice.Profiler(model, K, metrics=("avg", "var", "taylor")) as plain:
            for x, y in _bucketed(seqs, ys):
                with plain.batch(y):
                    F.cross_entropy(model(**x).logits, y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
        # the padded batches' mask moved out of the inputs: the padding counts, the statistics differ
        leaky = [({"features": {"input_ids": x["input_ids"]}}, y) for x, y in _padded(seqs, ys)]
        leaked = neuslice.profile(wrapped, leaky, K, metrics=("avg",), progress=False)
    strip = [n[len("inner."):] for n in padded.layer_names]
    assert strip == bucketed.layer_names
    for n in bucketed.layer_names:
        for s in padded.statistics:
            torch.testing.assert_close(padded.stats["inner." + n][s], bucketed.stats[n][s], **F64)
        for s in ("act_sum", "act_sq", "taylor_sum"):
            torch.testing.assert_close(prof.profile().stats["inner." + n][s], plain.profile().stats[n][s], **F64)
    n = padded.layer_names[0]
    assert not torch.allclose(leaked.stats[n]["act_sum"], padded.stats[n]["act_sum"], **F64)


def test_several_attention_masks_in_the_inputs_apply_none_and_warn_once_naming_them():
    class Pair(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return self.inner(**a).logits + self.inner(**b).logits

    model, vocab = _hf("bert")
    pair = Pair(model)
    seqs, ys = _sequences(vocab)
    batches = [({"a": x, "b": {**x, "attention_mask": x["attention_mask"].clone()}}, y) for x, y in _padded(seqs, ys)]
    for run in ("profile", "Profiler"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if run == "profile":
                neuslice.profile(pair, batches, K, metrics=("avg",), progress=False)
            else:
                with neuslice.Profiler(pair, K, metrics=("avg",)) as prof:
                    for x, y in batches:
                        with prof.batch(y):
                            F.cross_entropy(pair(**x), y).backward()
        said = [str(m.message) for m in w if "attention_mask tensors" in str(m.message)]
        assert len(said) == 1, said
        assert "a.attention_mask, b.attention_mask" in said[0] and "mask=" in said[0]


def test_a_nested_attention_mask_gives_deeplift_the_baseline_padded_as_each_sample():
    """The reference of a padded sample is the baseline with its own mask row put where the inputs hold it; a
    user baseline is given structured as the inputs."""
    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = _Mix().double()

        def forward(self, features):
            return self.mix(**features)

    model = Nested().eval()
    batches = _mix_batches()
    base_tok = torch.tensor([[3, 1, 4, 1, 5, 9]])
    for baseline in (None, {"features": {"tok": base_tok, "attention_mask": torch.ones(1, 6, dtype=torch.long)}}):
        prof = neuslice.profile(model, [({"features": x}, y) for x, y in batches], 4, layers=["mix.ffn1", "mix.ffn2"],
                                metrics=("deeplift",), baseline=baseline, progress=False)
        want = _mix_deeplift_by_hand(model.mix, batches, base_tok[0] if baseline else torch.zeros(6, dtype=torch.long))
        for n in ("ffn1", "ffn2"):
            torch.testing.assert_close(prof.stats["mix." + n]["deeplift_sum"], want[n], **F64)
    with pytest.raises(TypeError, match=r"attention_mask \(at features.attention_mask\) pads, so baseline must be "
                                        r"one sample's inputs structured as each batch's"):
        neuslice.profile(model, [({"features": x}, y) for x, y in batches], 4, metrics=("deeplift",),
                         baseline={"tok": base_tok}, progress=False)


# ---------------------------------------------------------------------------------------------
# per-token labels with ignore positions, against a float64 hand loop over unpadded sequences

def _hand_tokens(model, prof, seqs, ys, target="logit"):
    """docs/method.md §2 per token, by a loop over each unpadded sequence: the target is the sum over its counted
    tokens; each counted token is one sample."""
    mods = dict(model.named_modules())
    out = {e["name"]: {s: torch.zeros((K,) if s == "count" else (K, e["n"]), dtype=torch.float64)
                       for s in ("count", "act_sum", "act_sq", "taylor_sum")} for e in prof.layers}
    for s, y in zip(seqs, ys):
        got = {}
        hs = [mods[e["tap"]].register_forward_hook(lambda m, a, o, n=e["name"]: got.__setitem__(n, o))
              for e in prof.layers]
        logits = model(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits[0]
        for h in hs:
            h.remove()
        keep = y != -100
        tgt = (logits[keep].gather(1, y[keep, None]).sum() if target == "logit"
               else F.cross_entropy(logits[keep], y[keep], reduction="sum"))
        names = list(got)
        grads = torch.autograd.grad(tgt, [got[n] for n in names])
        for n, g in zip(names, grads):
            a, g, st = got[n][0].detach(), g[0], out[n]
            for t in keep.nonzero().flatten().tolist():
                k = int(y[t])
                st["count"][k] += 1
                st["act_sum"][k] += a[t]
                st["act_sq"][k] += a[t] ** 2
                st["taylor_sum"][k] += (a[t] * g[t]).abs()
    return out


def test_per_token_labels_with_ignore_positions_match_a_float64_hand_loop():
    model, vocab = _hf("bert", token=True)
    seqs, ys = _sequences(vocab, per_token=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = neuslice.profile(model, _padded(seqs, ys, per_token=True), K, metrics=("avg", "var", "taylor"),
                                progress=False)
    assert float(prof.counts.sum()) == sum(int((y != -100).sum()) for y in ys)
    want = _hand_tokens(model, prof, seqs, ys)
    for n in prof.layer_names:
        for s in prof.statistics:
            torch.testing.assert_close(prof.stats[n][s], want[n][s], **F64, msg=lambda m, n=n, s=s: f"{n}/{s}: {m}")


def test_profiler_per_token_labels_with_ignore_positions_match_the_hand_loop():
    model, vocab = _hf("bert", token=True)
    seqs, ys = _sequences(vocab, per_token=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with neuslice.Profiler(model, K, metrics=("avg", "var", "taylor")) as prof:
            for x, y in _padded(seqs, ys, per_token=True):
                with prof.batch(y):
                    F.cross_entropy(model(**x).logits.reshape(-1, K), y.reshape(-1), ignore_index=-100,
                                    reduction="sum").backward()
    got = prof.profile()
    want = _hand_tokens(model, got, seqs, ys, target="loss")
    for n in got.layer_names:
        for s in got.statistics:
            torch.testing.assert_close(got.stats[n][s], want[n][s], **F64, msg=lambda m, n=n, s=s: f"{n}/{s}: {m}")


# ---------------------------------------------------------------------------------------------
# an explicit mask on plain models

def _token_batches(per_token, seed=5):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 20, (10, 6), generator=g)
    mask = torch.ones(10, 6, dtype=torch.bool)
    for i, n in enumerate((6, 4, 2, 6, 5, 3, 1, 6, 4, 2)):
        mask[i, n:] = False
    y = tok % 4 if per_token else tok[:, 0] % 4
    if per_token:
        y = torch.where(tok % 5 == 0, -100, y)                    # some ignored tokens among the valid ones
    return [(tok[:5], y[:5], mask[:5]), (tok[5:], y[5:], mask[5:])]


def _hand_masked(model, batches, per_token, target="logit"):
    """The mask's definition by hand (float64): x̄ over valid positions, taylor summed over them; the model itself
    sees every position (it does not know the mask)."""
    m64 = copy.deepcopy(model).double()
    st = {l: {s: torch.zeros((4,) if s == "count" else (4, n), dtype=torch.float64)
              for s in ("count", "act_sum", "act_sq", "taylor_sum")} for l, n in (("ffn1", 12), ("ffn2", 8))}
    for tok, y, mask in batches:
        got = {}
        hs = [m64.act.register_forward_hook(lambda m, a, o: got.__setitem__("ffn1", o)),
              m64.ffn2.register_forward_hook(lambda m, a, o: got.__setitem__("ffn2", o))]
        out = m64(tok)
        for h in hs:
            h.remove()
        keep = (y != -100) & mask if per_token else torch.ones_like(y, dtype=torch.bool)
        if target == "logit":
            tgt = out[keep].gather(-1, y[keep, None]).sum()
        else:
            tgt = F.cross_entropy(out[keep], y[keep], reduction="sum")
        grads = torch.autograd.grad(tgt, [got["ffn1"], got["ffn2"]])
        for l, g in zip(("ffn1", "ffn2"), grads):
            a, s = got[l].detach(), st[l]
            for b in range(tok.shape[0]):
                v = mask[b]
                if per_token:
                    for t in (keep[b]).nonzero().flatten().tolist():
                        k = int(y[b, t])
                        s["count"][k] += 1
                        s["act_sum"][k] += a[b, t]
                        s["act_sq"][k] += a[b, t] ** 2
                        s["taylor_sum"][k] += (a[b, t] * g[b, t]).abs()
                elif v.any():
                    k = int(y[b])
                    xbar = a[b, v].mean(0)
                    s["count"][k] += 1
                    s["act_sum"][k] += xbar
                    s["act_sq"][k] += xbar ** 2
                    s["taylor_sum"][k] += (a[b, v] * g[b, v]).sum(0).abs()
    return st


@pytest.mark.parametrize("per_token", [False, True])
def test_explicit_mask_on_a_plain_model_matches_the_hand_loop(per_token):
    model = TokenNet(pooled=not per_token).eval()
    batches = _token_batches(per_token)
    prof = neuslice.profile(model, batches, 4, metrics=("avg", "var", "taylor"), progress=False)
    want = _hand_masked(model, batches, per_token)
    for l in ("ffn1", "ffn2"):
        for s in prof.statistics:
            torch.testing.assert_close(prof.stats[l][s], want[l][s], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, l=l, s=s: f"{l}/{s}: {m}")
    # the Profiler, with mask=, gives the loss-target profile
    with neuslice.Profiler(model, 4, metrics=("avg", "var", "taylor")) as p:
        for tok, y, mask in batches:
            with p.batch(y, mask=mask):
                out = model(tok)
                if per_token:
                    y = torch.where(mask, y, -100)
                F.cross_entropy(out.reshape(-1, 4), y.reshape(-1), ignore_index=-100, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    want = _hand_masked(model, batches, per_token, target="loss")
    got = p.profile()
    for l in ("ffn1", "ffn2"):
        for s in got.statistics:
            torch.testing.assert_close(got.stats[l][s], want[l][s], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, l=l, s=s: f"{l}/{s}: {m}")


def test_a_mask_that_fits_no_tap_warns_once_and_drops_only_samples_without_a_valid_position():
    model = WideHead(5).double().eval()                              # float64: the two runs take different kernels
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 64, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[2] = False                                                  # sample 2: no valid position at all
    with pytest.warns(UserWarning, match=r"applies to taps \[B, 3, N\] only; no sliced layer has such a tap") as w:
        got = neuslice.profile(model, [(x, y, mask), (x, y, mask)], 5, metrics=("avg", "taylor"), progress=False)
    assert sum("applies to taps" in str(r.message) for r in w) == 1
    keep = torch.arange(8) != 2
    want = neuslice.profile(model, [(x[keep], y[keep])] * 2, 5, metrics=("avg", "taylor"), progress=False)
    _same(got, want)


def test_a_layer_called_twice_is_masked_in_the_call_whose_positions_fit():
    """``shared`` runs on [B, 16] (one position: kept) and on [B, 3, 16] (the mask applies); the warning names no
    layer, since every tap with positions fits."""
    from test_profiler import _Twice
    model = _Twice().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 64, generator=g), torch.randint(0, 10, (6,), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = neuslice.profile(model, [(x, y, mask)], 10, layers=["shared"], metrics=("avg", "taylor"),
                                progress=False)
    m = copy.deepcopy(model).double()
    outs = []
    h = m.act.register_forward_hook(lambda mod, a, o: outs.append(o))
    logits = m(x.double())
    h.remove()
    one, three = outs[1], outs[2]                                    # outs[0] is fc0's ReLU
    g1, g3 = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), [one, three])
    xs = torch.cat([one.unsqueeze(1), three], 1).detach()            # [B, 1 + 3, 16]: the calls joined along s
    gs = torch.cat([g1.unsqueeze(1), g3], 1)
    v = torch.cat([torch.ones(6, 1, dtype=torch.bool), mask], 1)
    act = torch.zeros(10, 16, dtype=torch.float64)
    tay = torch.zeros(10, 16, dtype=torch.float64)
    for b in range(6):
        act[y[b]] += xs[b, v[b]].mean(0)
        tay[y[b]] += (xs[b, v[b]] * gs[b, v[b]]).sum(0).abs()
    torch.testing.assert_close(prof.stats["shared"]["act_sum"], act, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prof.stats["shared"]["taylor_sum"], tay, rtol=1e-5, atol=1e-6)


def test_vit_taps_that_do_not_fit_the_mask_are_named_in_one_warning():
    pytest.importorskip("transformers")
    import hf_models as hf
    model, batch = hf.vit()
    model = model.double()
    x = batch(4).double()
    y = torch.tensor([0, 1, 2, 0])
    mask = torch.ones(4, 5, dtype=torch.bool)                       # 5 positions: the ViT has 17 tokens
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = neuslice.profile(model, [({"pixel_values": x}, y, mask)], K, metrics=("avg",), progress=False)
    msgs = [str(r.message) for r in w if "applies to taps" in str(r.message)]
    assert len(msgs) == 1 and "[4, 17, " in msgs[0] and got.layer_names[0] in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = neuslice.profile(model, [({"pixel_values": x}, y)], K, metrics=("avg",), progress=False)
    _same(got, plain)


def test_bad_masks_and_ignore_index_are_refused_naming_what_came():
    model = TokenNet(pooled=True).eval()
    tok, y, mask = _token_batches(False)[0]
    with pytest.raises(ValueError, match=r"neuslice.profile: mask must be \[B, T\] with B = 5 .* got \[4, 6\]"):
        neuslice.profile(model, [(tok, y, mask[:4])], 4, progress=False)
    with pytest.raises(TypeError, match=r"neuslice.profile: mask must be bool .* or integer 0/1, got torch.float32"):
        neuslice.profile(model, [(tok, y, mask.float())], 4, progress=False)
    with pytest.raises(ValueError, match=r"mask must hold 0 \(padding\) and 1 \(a token\) only, got values "
                                         r"in \[0, 2\]"):
        neuslice.profile(model, [(tok, y, mask.long() * 2)], 4, progress=False)
    with pytest.raises(TypeError, match=r"neuslice.profile: ignore_index must be an int .* got bool True"):
        neuslice.profile(model, [(tok, y)], 4, ignore_index=True, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) \(num_classes=4\) or equal ignore_index "
                                         r"\(-100\), got label -1"):
        neuslice.profile(model, [(tok, y - 1)], 4, progress=False)
    with pytest.raises(ValueError, match=r"Profiler.batch: mask must be \[B, T\] with B = 5"):
        neuslice.Profiler(model, 4).batch(y, mask=mask[:2])


def test_ignore_index_of_its_own_and_samples_all_ignored():
    """A user ignore_index inside [0, K) skips that label; a batch whose every label is ignored adds nothing."""
    model = TokenNet(pooled=True).eval()
    (tok, y, _), (tok2, y2, _) = _token_batches(False)
    got = neuslice.profile(model, [(tok, y), (tok2, torch.full_like(y2, 2))], 4, ignore_index=2,
                           metrics=("avg", "taylor"), progress=False)
    keep = y != 2
    want = neuslice.profile(model, [(tok[keep], y[keep])], 4, metrics=("avg", "taylor"), progress=False)
    _same(got, want)
    assert float(got.counts[2]) == 0


class _Masked(TokenNet):
    def forward(self, tok, attention_mask):                     # the mask passed positionally, model ignores it
        return super().forward(tok)


def test_profiler_reads_an_attention_mask_passed_by_position():
    model = _Masked(pooled=True).eval()
    batches = _token_batches(False)

    def run(explicit):
        with neuslice.Profiler(model, 4, metrics=("avg", "taylor")) as p:
            for tok, y, mask in batches:
                with p.batch(y, mask=mask if explicit else None):
                    F.cross_entropy(model(tok, mask.long()), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
        return p.profile()

    got, want = run(False), run(True)
    _same(got, want)
    # the mask has padding, so reading it matters: without it the statistics differ
    nomask = neuslice.profile(model, [((tok, torch.ones_like(m, dtype=torch.long)), y) for tok, y, m in batches], 4,
                              metrics=("avg",), target="loss", progress=False)
    assert not torch.allclose(nomask.stats["ffn2"]["act_sum"], got.stats["ffn2"]["act_sum"])


# ---------------------------------------------------------------------------------------------
# DeepLIFT's reference per sample: the baseline padded as the sample is (docs/method.md §2, Reference r)

class _Mix(torch.nn.Module):
    """Token + position embeddings, plus their mean over the valid positions (so every position's activation,
    the reference's too, depends on the padding), FFN (Linear-ReLU-Linear-ReLU), masked mean pool, head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.emb, self.pos = torch.nn.Embedding(20, 8), torch.nn.Parameter(torch.randn(6, 8))
        self.ffn1, self.act1 = torch.nn.Linear(8, 12), torch.nn.ReLU()
        self.ffn2, self.act2 = torch.nn.Linear(12, 8), torch.nn.ReLU()
        self.head = torch.nn.Linear(8, 4)

    @staticmethod
    def _mean(h, m):
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)

    def forward(self, tok, attention_mask):
        m = attention_mask.to(self.pos.dtype)
        e = self.emb(tok) + self.pos
        a2 = self.act2(self.ffn2(self.act1(self.ffn1(e + self._mean(e, m)[:, None]))))
        return self.head(self._mean(a2, m))


def _mix_batches():
    g = torch.Generator().manual_seed(8)
    tok = torch.randint(1, 20, (11, 6), generator=g)
    lengths = torch.tensor([6, 3, 5, 3, 2, 4, 4, 4, 6, 6, 6])
    am = (torch.arange(6) < lengths[:, None]).long()
    tok = tok * am
    y = tok[:, 0] % 4
    cut = [(0, 5), (5, 8), (8, 11), (0, 5)]   # mixed rows; one row shared by all; unpadded; the first again (cached)
    return [({"tok": tok[a:b], "attention_mask": am[a:b]}, y[a:b]) for a, b in cut]


def _mix_deeplift_by_hand(model, batches, base_tok, ones_ref=False):
    """deeplift_sum written out (float64): sample b's reference input is ``base_tok`` with b's own mask row (or,
    ``ones_ref``, a mask of ones: a reference without padding); Rescale multipliers of f_y through both ReLUs."""
    w1, b1, w2, b2 = (t.double() for t in (model.ffn1.weight, model.ffn1.bias, model.ffn2.weight, model.ffn2.bias))
    w3, emb, pos = model.head.weight.double(), model.emb.weight.double(), model.pos.double()

    def acts(tok, m):
        e = emb[tok] + pos
        h1 = (e + (e * m[:, None]).sum(0) / m.sum()) @ w1.t() + b1
        a1 = h1.relu()
        h2 = a1 @ w2.t() + b2
        return h1, a1, h2, h2.relu()

    def resc(h, a, hr, ar):
        d = h - hr
        return torch.where(d.abs() > 1e-7, (a - ar) / torch.where(d.abs() > 1e-7, d, torch.ones_like(d)),
                           (h > 0).double())

    out = {n: torch.zeros(4, w, dtype=torch.float64) for n, w in (("ffn1", 12), ("ffn2", 8))}
    for x, y in batches:
        for tok, mask, k in zip(x["tok"], x["attention_mask"], y.tolist()):
            m = mask.double()
            h1, a1, h2, a2 = acts(tok, m)
            h1r, a1r, h2r, a2r = acts(base_tok, torch.ones_like(m) if ones_ref else m)
            m_a2 = m[:, None] * w3[k] / m.sum()                         # f_y = w3[y] · mean over valid positions
            m_a1 = (m_a2 * resc(h2, a2, h2r, a2r)) @ w2
            v = mask.bool()
            out["ffn2"][k] += ((a2 - a2r) * m_a2)[v].sum(0).abs()
            out["ffn1"][k] += ((a1 - a1r) * m_a1)[v].sum(0).abs()
    return out


@pytest.mark.parametrize("given", [False, True])
def test_deeplift_reference_is_the_baseline_padded_as_each_sample_matching_a_hand_loop(given):
    """Padded batches with distinct rows (stacked references), with one row shared by all (expanded), unpadded
    (the shared reference), and a batch again (from the cache); zeros baseline or the user's (a mapping)."""
    model = _Mix().double().eval()
    batches = _mix_batches()
    base_tok = torch.tensor([[3, 1, 4, 1, 5, 9]]) if given else torch.zeros(1, 6, dtype=torch.long)
    baseline = {"tok": base_tok, "attention_mask": torch.ones(1, 6, dtype=torch.long)} if given else None
    prof = neuslice.profile(model, batches, 4, layers=["ffn1", "ffn2"], metrics=("deeplift",), baseline=baseline,
                            progress=False)
    assert prof.deeplift == "rescale"
    want = _mix_deeplift_by_hand(model, batches, base_tok[0])
    for n in ("ffn1", "ffn2"):
        torch.testing.assert_close(prof.stats[n]["deeplift_sum"], want[n], **F64, msg=lambda m, n=n: f"{n}: {m}")
    # a reference without padding (the definition before) gives other numbers: the test can fail
    old = _mix_deeplift_by_hand(model, batches, base_tok[0], ones_ref=True)
    assert not torch.allclose(old["ffn1"], want["ffn1"], rtol=1e-3)
    assert not torch.allclose(old["ffn2"], want["ffn2"], rtol=1e-3)


def test_a_padded_mapping_needs_a_mapping_baseline():
    model = _Mix().double().eval()
    with pytest.raises(TypeError, match=r"neuslice.profile: the inputs' attention_mask \(at attention_mask\) pads, "
                                        r"so baseline must be one sample's inputs structured as each batch's.* got "
                                        r"Tensor"):
        neuslice.profile(model, _mix_batches()[:1], 4, metrics=("deeplift",), baseline=torch.zeros(1, 6),
                         progress=False)


def _bert_padded_twice():
    model, vocab = _hf("bert")
    seqs, ys = _sequences(vocab)
    return model, _padded(seqs, ys) * 2               # every row a second time: from the cache


def _profile_spy(monkeypatch, model, batches, max_bytes):
    """profile with the row cache bounded at ``max_bytes``; also the cache (hits, misses, evictions, bytes)."""
    from neuslice.engine import profile as engine_profile, refrows
    seen = []

    class Spy(refrows.RowRefs):
        def __init__(self):
            super().__init__(max_bytes)
            seen.append(self)
    monkeypatch.setattr(engine_profile, "RowRefs", Spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = neuslice.profile(model, batches, K, metrics=("deeplift", "avg"), progress=False)
    return prof, seen[0]


def test_row_cache_gives_the_uncached_references_and_its_bound_evicts(monkeypatch):
    model, batches = _bert_padded_twice()
    rows = len({tuple(r) for x, _ in batches for r in x["attention_mask"].tolist()})    # distinct padded rows
    cached, c = _profile_spy(monkeypatch, model, batches, 256 << 20)
    assert c.misses == rows and c.hits > 0 and c.evictions == 0 and len(c) == rows
    one = c.bytes // rows                                                              # one row's references
    uncached, u = _profile_spy(monkeypatch, model, batches, 0)                         # every batch computes its rows
    assert u.hits == 0 and len(u) == 0 and u.bytes == 0
    bounded, b = _profile_spy(monkeypatch, model, batches, 2 * one)                    # room for two rows
    assert b.evictions > 0 and len(b) <= 2 and b.bytes <= 2 * one and b.misses > rows
    _same(cached, uncached)
    _same(bounded, uncached)


def test_row_cache_evicts_the_least_recently_used_by_bytes():
    from neuslice.engine.refrows import RowRefs
    taps = [torch.arange(12.).reshape(3, 4), torch.arange(6.).reshape(3, 2)]         # a reference batch of 3 rows
    dl = {1: [(taps[0] * 2, taps[0])]}                                               # the output is the first tap
    e = RowRefs(0).split(taps, dl, 3)
    assert e[1].nbytes == (4 + 2 + 4) * 4 and e[1].dl[1][0][1] is e[1].taps[0]        # stored once
    c = RowRefs(2 * e[0].nbytes)
    c.insert("a", e[0]), c.insert("b", e[1])
    assert c.lookup(["a", "z"]) == [e[0], None]                                      # "a" now the most recent
    c.insert("c", e[2])
    assert c.lookup(["a", "b", "c"]) == [e[0], None, e[2]] and c.evictions == 1 and c.bytes == 2 * e[0].nbytes
    taps_b, dl_b = c.assemble([e[2], e[0], e[2]])
    torch.testing.assert_close(taps_b[0], taps[0][[2, 0, 2]])
    assert dl_b[1][0][1] is taps_b[0]                                                 # stacked once, shared
    taps_1, dl_1 = c.assemble([e[1]] * 4)                                            # one row: expanded, no copy
    assert taps_1[1].shape == (4, 2) and taps_1[1].stride(0) == 0 and dl_1[1][0][0].shape == (1, 4)
