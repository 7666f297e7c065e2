"""Windowed attention (Swin): q/k/v/out taps whose batch dim holds each sample's windows, ``[B * windows, T, N]``
(docs/method.md §1 "Batch folds"). The probe reads the fold and its order from the layout operations around the
layer; statistics treat a sample's windows as its positions and leave out positions that only pad the windows;
whole heads (with Swin's per-head relative position bias table) are removed physically; a fold in any other
order is refused by name. Built offline from tiny configs (random weights)."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import neuslice
from neuslice.engine import heads
from neuslice.engine.capture import call_model
from neuslice.engine.graph import discover
from helpers import physical_equals_mask

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
KEEP = [0, 2]
B0 = "swin.encoder.layers.0.blocks.1."          # the shifted-window block of stage 0


def swin(image: int = 32):
    """SwinForImageClassification, 4×4 patches, windows of 4, stages of depth 2 and 1 (the second block of stage 0
    shifts its windows). ``image`` 32: 8×8 tokens, 4 windows per sample in stage 0, one in stage 1; 40: 10×10
    tokens padded to 12×12, 9 windows per sample of which 5 hold padding, and 4 in stage 1 (5×5 padded to 8×8)."""
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=image, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 1],
                                  num_heads=[2, 4], window_size=4, drop_path_rate=0.0, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=K)
    return transformers.SwinForImageClassification(cfg).eval()


def data(image: int = 32, n: int = 3, b: int = 6):
    g = torch.Generator().manual_seed(1)
    return [({"pixel_values": torch.randn(b, 3, image, image, generator=g)}, torch.arange(b) % K) for _ in range(n)]


def plan_of(model, x):
    return {i.name: i for i in discover(model, run=lambda: call_model(model, x), _probe=True).layers}


def test_probe_reads_windows_folded_into_the_batch():
    model = swin(32)
    info = plan_of(model, data(32)[0][0])
    for r in ("q_proj", "k_proj", "v_proj", "o_proj"):
        i = info[B0 + "attention." + r]
        assert (i.fold, i.fold_error) == (4, None) and i.fold_valid is None
        assert info["swin.encoder.layers.1.blocks.0.attention." + r].fold == 1      # one window: no fold
    assert info[B0 + "mlp.fc1"].fold == 1 and info["swin.encoder.layers.0.downsample.reduction"].fold == 1


def test_probe_finds_the_positions_that_pad_the_windows():
    model = swin(40)
    info = plan_of(model, data(40)[0][0])
    real = torch.zeros(12, 12, dtype=torch.bool)
    real[:10, :10] = True
    for r in ("q_proj", "v_proj", "o_proj"):
        i = info[B0 + "attention." + r]
        assert i.fold == 9 and i.fold_error is None
        # the shifted block rolls the map by 2 before partitioning it into windows of 4×4
        rolled = real.roll((-2, -2), (0, 1))
        want = rolled.view(3, 4, 3, 4).transpose(1, 2).reshape(-1)
        assert torch.equal(i.fold_valid, want)
    assert int(info["swin.encoder.layers.1.blocks.0.attention.q_proj"].fold_valid.sum()) == 25


def _hand(model, d, name, tap):
    """Per class, float64: the sum over samples of each sample's mean over its real tokens of ``name``'s output
    (``tap``: where that output is read unfolded), and the sum of the squared means; and of |Σ_s x·g| of the loss
    gradient at the folded output."""
    mods = dict(model.named_modules())
    lin = mods[name]
    sums, sq = torch.zeros(K, lin.out_features, dtype=torch.float64), torch.zeros(K, lin.out_features, dtype=torch.float64)
    for x, y in d:
        got = []
        h = mods[tap[0]].register_forward_hook(lambda m, a, o: got.append((a[0] if tap[1] == "in" else o).detach()))
        with torch.no_grad():
            call_model(model, x)
        h.remove()
        seq = got[0].double()
        if tap[2]:
            seq = seq @ lin.weight.double().t() + lin.bias.double()
        mean = seq.mean(1)                               # [B, N]: over the real tokens only
        sums.index_add_(0, y, mean)
        sq.index_add_(0, y, mean * mean)
    return sums, sq


@pytest.mark.parametrize("image", [32, 40])
def test_statistics_count_each_sample_over_its_real_tokens(image):
    """avg/var of q (read unfolded: q_proj of the LayerNorm output over the map) and of the out projection (its
    output where it rejoins the residual, after the reverse partition, shift and crop) equal a float64 hand loop."""
    model, d = swin(image), data(image)
    prof = neuslice.profile(model, d, K, metrics=("avg", "var"), progress=False)
    assert torch.equal(prof.counts.float(), torch.tensor([6., 6., 6.]))
    cases = {B0 + "attention.q_proj": (B0 + "layernorm_before", "out", True),
             B0 + "attention.o_proj": (B0 + "drop_path", "in", False)}
    for name, tap in cases.items():
        sums, sq = _hand(model, d, name, tap)
        torch.testing.assert_close(prof.stats[name]["act_sum"].double(), sums, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prof.stats[name]["act_sq"].double(), sq, rtol=1e-5, atol=1e-6)


def test_profiler_in_a_training_loop_matches_profile_statistics():
    model, d = swin(40), data(40)
    want = neuslice.profile(model, d, K, metrics=("avg",), target="loss", progress=False)
    with neuslice.Profiler(model, num_classes=K, metrics=("avg", "taylor")) as prof:
        for x, y in d:
            with prof.batch(y):
                nn.functional.cross_entropy(model(**x).logits, y).backward()
            model.zero_grad()
    got = prof.profile()
    for name in (B0 + "attention.k_proj", B0 + "attention.o_proj"):
        torch.testing.assert_close(got.stats[name]["act_sum"], want.stats[name]["act_sum"], rtol=1e-5, atol=1e-6)
        assert bool(got.stats[name]["taylor_sum"].gt(0).any())


@pytest.mark.parametrize("image", [32, 40])
def test_physical_restructure_removes_heads_with_their_relative_position_bias(image):
    model, d = swin(image), data(image)
    names = neuslice.removable_layers(model, d[0][0])
    assert B0 + "attention.q_proj" in names and B0 + "mlp.fc1" in names
    assert B0 + "attention.o_proj" not in names and B0 + "mlp.fc2" not in names     # the residual stream
    prof = neuslice.profile(model, d, K, layers=names, metrics=("taylor",), progress=False)
    phys, left = physical_equals_mask(model, neuslice.semantic_slice(prof, "taylor", 0.3), KEEP, d[0][0], d[1][0])
    mods = dict(phys.module.named_modules())
    for a, n in left.items():
        assert mods[a.module + ".relative_position_bias"].relative_position_bias_table.shape == (49, n)
    assert sum(a.heads - n for a, n in left.items()) > 0


def test_per_head_tensors_are_the_blocks_own_with_one_heads_dim():
    model = swin(32)
    a = next(x for x in discover(model, run=lambda: call_model(model, data(32)[0][0]), _probe=True).attention
             if x.module == B0 + "attention")
    got = [(name, dim) for name, _, _, dim in heads.per_head_tensors(model, a)]
    assert got == [(B0 + "attention.relative_position_bias.relative_position_bias_table", 1)]


class WindowMajor(nn.Module):
    """Splits each sample's 8 tokens into 2 windows and folds them into the batch window-major ([window, sample]
    order, the order Swin does not use), then attends per window: its q/k/v rows do not follow the samples.
    ``traceable`` False: a branch on a tensor's value keeps torch.fx from tracing it (so the probe reads it)."""

    def __init__(self, traceable: bool):
        super().__init__()
        self.traceable = traceable
        self.embed = nn.Linear(4, 8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, K)

    def forward(self, x):                                       # x [B, 8, 4]
        b = x.shape[0]
        h = self.embed(x)
        if not self.traceable and bool(h.isnan().any()):
            raise ValueError("nan")
        w = h.view(b, 2, 4, 8).transpose(0, 1).reshape(2 * b, 4, 8)
        att = torch.softmax(self.q(w) @ self.k(w).transpose(1, 2), -1) @ self.v(w)
        y = self.o(att).reshape(2, b, 4, 8).transpose(0, 1).reshape(b, 8, 8)
        return self.head((h + y).mean(1))


def test_a_fold_in_another_order_is_refused_by_name():
    model = WindowMajor(traceable=False).eval()
    g = torch.Generator().manual_seed(0)
    d = [(torch.randn(4, 8, 4, generator=g), torch.arange(4) % K)]
    info = plan_of(model, d[0][0])
    assert info["q"].fold == 2 and info["q"].fold_error == "the probe shows its rows mix samples"
    assert info["o"].fold == 2 and info["o"].fold_error == "the probe shows its rows mix samples"
    with pytest.raises(ValueError, match=r"layer 'q' \(tapped at 'q'\) gave output \[8, 4, 8\], 2 pieces per sample "
                                         r"folded into the batch dim \(windowed attention\), but the probe shows its "
                                         r"rows mix samples; choose layers= without it"):
        neuslice.profile(model, d, K, metrics=("avg",), progress=False)
    assert neuslice.profile(model, d, K, layers=["embed"], metrics=("avg",), progress=False).layer_names == ["embed"]



class TwoOrders(nn.Module):
    """Adds the sample-major fold of its tokens (Swin's order) to the window-major one before the q/k/v layers:
    each row of the sum holds two samples. The sum's first operand alone follows the samples, so a probe that
    read only that one would take the fold for Swin's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, K)

    def forward(self, x):                                       # x [B, 8, 4]
        b = x.shape[0]
        h = self.embed(x)
        if bool(h.isnan().any()):                               # (keeps torch.fx from tracing it)
            raise ValueError("nan")
        w = h.view(b, 2, 4, 8).reshape(2 * b, 4, 8) + h.view(b, 2, 4, 8).transpose(0, 1).reshape(2 * b, 4, 8)
        att = torch.softmax(self.q(w) @ self.k(w).transpose(1, 2), -1) @ self.v(w)
        return self.head(att.reshape(b, 8, 8).mean(1))


def test_a_fold_made_of_two_orders_is_refused():
    model = TwoOrders().eval()
    x = torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(0))
    info = plan_of(model, x)
    for r in ("q", "k", "v"):
        assert info[r].fold == 2 and info[r].fold_error == "the probe shows its rows mix samples"
    with pytest.raises(ValueError, match=r"layer 'q' .* but the probe shows its rows mix samples"):
        neuslice.profile(model, [(x, torch.arange(4) % K)], K, metrics=("avg",), progress=False)

def test_a_fold_in_a_traced_model_is_named_in_the_error():
    model = WindowMajor(traceable=True).eval()
    d = [(torch.randn(4, 8, 4), torch.arange(4) % K)]
    with pytest.raises(ValueError, match=r"layer 'q' \(tapped at 'q'\) gave output \[8, 4, 8\]; expected "
                                         r"\[B, ..., N\] = \[4, ..., 8\] with B the batch size of the labels \(its "
                                         r"batch dim holds 2 rows per sample.*choose layers= without 'q'\)"):
        neuslice.profile(model, d, K, metrics=("avg",), progress=False)


def test_a_probe_of_one_sample_cannot_vouch_for_the_order():
    """With one sample every row is that sample's, whatever the order: the fold is read but not its order. The
    Profiler, whose baseline (a batch of one) was its probe, probes its first batch of more samples again; a batch
    of more samples after a first batch of one is refused by name."""
    model = swin(32)
    info = plan_of(model, data(32, b=1)[0][0])
    q = info[B0 + "attention.q_proj"]
    assert (q.fold, q.fold_error, q.fold_ordered) == (4, None, False)
    x, y = data(32)[0]
    baseline = torch.zeros(1, 3, 32, 32)
    with neuslice.Profiler(model, num_classes=K, metrics=("avg",), baseline=baseline) as prof:
        assert prof.plan is not None and prof._unordered_folds()
        with prof.batch(y):
            nn.functional.cross_entropy(model(**x).logits, y).backward()
        assert not prof._unordered_folds()
    with neuslice.Profiler(model, num_classes=K, metrics=("avg",)) as plain:    # probes the batch: 6 samples
        with plain.batch(y):
            nn.functional.cross_entropy(model(**x).logits, y).backward()
    torch.testing.assert_close(prof.profile().stats[B0 + "attention.q_proj"]["act_sum"],
                               plain.profile().stats[B0 + "attention.q_proj"]["act_sum"])
    x1, y1 = data(32, b=1)[0]
    late = neuslice.Profiler(model, num_classes=K, metrics=("avg",), baseline=baseline)
    with late.batch(y1):                                # a first batch of one: the order stays unknown
        nn.functional.cross_entropy(model(**x1).logits, y1).backward()
    with pytest.raises(ValueError, match=r"attention.q_proj' \(tapped at .*\) gave output \[24, 16, 16\], 4 pieces per "
                                         r"sample folded into the batch dim \(windowed attention\), but the probe "
                                         r"forward ran on one sample"):
        with late.batch(y):
            nn.functional.cross_entropy(model(**x).logits, y).backward()
    late.close()


def test_an_input_size_the_probe_did_not_see_is_refused_by_name():
    model = swin(32)
    d32, d40 = data(32), data(40)
    with pytest.raises(ValueError, match=r"gave output \[54, 16, 16\]; expected .* \(its batch dim holds 9 rows per "
                                         r"sample where the probe forward saw 4: inputs of another size fold "
                                         r"differently; profile one input size at a time\)"):
        neuslice.profile(model, d32[:1] + d40[:1], K, metrics=("avg",), progress=False)


def test_swin_v2_position_bias_mlp_is_not_sliced_and_heads_take_their_per_head_parameters():
    """Swin-V2 computes its relative position bias with a small MLP of Linear layers over a table of coordinates:
    they run on no sample (outputs without the batch dim), so they are left out with a warning naming them; a
    removed head takes its logit scale and its output of that MLP's last Linear."""
    torch.manual_seed(0)
    model = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4, num_channels=3,
        num_labels=K)).eval()
    d = data(32)
    v2 = "swinv2.encoder.layers.0.blocks.1.attention.self."
    mlp = v2 + "continuous_position_bias_mlp.0"
    with pytest.warns(UserWarning, match=r"run on no sample \(outputs without the batch dim\): \[.*'" +
                      mlp.replace(".", r"\.") + "'"):
        prof = neuslice.profile(model, d, K, metrics=("taylor",), progress=False)
    assert mlp not in prof.layer_names and v2 + "query" in prof.layer_names
    with pytest.raises(ValueError, match=r"run on no sample: their outputs have no batch dim"):
        neuslice.profile(model, d, K, layers=[mlp], metrics=("taylor",), progress=False)
    names = neuslice.removable_layers(model, d[0][0])
    with pytest.warns(UserWarning, match=r"run on no sample"):
        prof = neuslice.profile(model, d, K, layers=names, metrics=("taylor",), progress=False)
    phys, left = physical_equals_mask(model, neuslice.semantic_slice(prof, "taylor", 0.3), KEEP, d[0][0], d[1][0])
    mods = dict(phys.module.named_modules())
    for a, n in left.items():
        assert mods[a.module].logit_scale.shape[0] == mods[a.module + ".continuous_position_bias_mlp.2"].out_features == n
    assert sum(a.heads - n for a, n in left.items()) > 0
