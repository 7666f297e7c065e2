"""docs/method.md §3: every metric from the sums, by hand; NaN rows for empty classes; the class-agnostic score."""
from __future__ import annotations

import math

import pytest
import torch

import neuslice
from neuslice import Profile
from neuslice.engine.slices import STATS
from slicing_fixtures import small_loader, trained


def _synthetic(k=3, n=4, seed=0, empty=(1,)):
    g = torch.Generator().manual_seed(seed)
    count = torch.tensor([5.0, 0.0, 7.0][:k], dtype=torch.float64)
    for e in empty:
        count[e] = 0
    act_sum = torch.randn(k, n, generator=g, dtype=torch.float64) * count[:, None]
    act_sq = (act_sum / count.clamp_min(1)[:, None]) ** 2 * count[:, None] + torch.rand(k, n, generator=g,
                                                                                        dtype=torch.float64)
    act_sq[0, 0] = (act_sum[0, 0] / 5) ** 2 * 5 - 1e-9           # float error below zero: var clamps at 0
    stats = {"count": count, "act_sum": act_sum, "act_sq": act_sq,
             "taylor_sum": torch.rand(k, n, generator=g, dtype=torch.float64) * count[:, None],
             "deeplift_sum": torch.rand(k, n, generator=g, dtype=torch.float64) * count[:, None]}
    for s in STATS[1:]:
        stats[s][list(empty)] = 0
    layers = [{"name": "l", "type": "Linear", "weight_shape": [n, 2], "n": n, "tap": "l", "tap_source": "layer",
               "deeplift": "rescale"}]
    return Profile(layers, [str(i) for i in range(k)], {"l": stats}, metrics=("avg", "var", "taylor", "deeplift"),
                   target="logit", deeplift="rescale")


def _hand(st, metric, k, n):
    out = torch.full((k, n), float("nan"), dtype=torch.float64)
    for c in range(k):
        cnt = float(st["count"][c])
        if cnt == 0:
            continue
        for j in range(n):
            mean = float(st["act_sum"][c, j]) / cnt
            vals = {"avg": max(mean, 0.0), "var": max(float(st["act_sq"][c, j]) / cnt - mean * mean, 0.0),
                    "taylor": float(st["taylor_sum"][c, j]) / cnt, "deeplift": float(st["deeplift_sum"][c, j]) / cnt}
            out[c, j] = vals[metric]
    return out


@pytest.mark.parametrize("metric", ["avg", "var", "taylor", "deeplift"])
def test_base_metrics_by_hand(metric):
    p = _synthetic()
    got = p.score(metric)["l"]
    torch.testing.assert_close(got, _hand(p.stats["l"], metric, 3, 4), equal_nan=True, rtol=1e-12, atol=1e-12)
    assert bool(torch.isnan(got[1]).all()) and bool((got[[0, 2]] >= 0).all())
    if metric == "var":
        assert float(got[0, 0]) == 0.0


def test_ens_is_the_mean_of_row_normalised_metrics():
    p = _synthetic()
    got = p.score("ens")["l"]
    parts = []
    for m in ("avg", "var", "taylor", "deeplift"):
        h = _hand(p.stats["l"], m, 3, 4)
        parts.append(h / h.sum(1, keepdim=True))
    want = torch.stack(parts).mean(0)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[[0, 2]].sum(1), torch.ones(2, dtype=torch.float64))


def test_class_agnostic_is_the_count_weighted_mean():
    p = _synthetic()
    for m in ("avg", "var", "taylor", "deeplift", "ens"):
        per = p.score(m)["l"]
        want = (5 * per[0] + 7 * per[2]) / 12
        torch.testing.assert_close(p.class_agnostic(m)["l"], want, rtol=1e-12, atol=1e-12)


def test_metrics_on_a_real_profile_are_finite_and_non_negative():
    prof = neuslice.profile(trained(), small_loader(60, 30), 10, progress=False)
    for m in neuslice.METRICS:
        for s in prof.score(m).values():
            assert s.shape[0] == 10 and bool(torch.isfinite(s).all()) and bool((s >= 0).all())


def test_metric_errors():
    p = _synthetic()
    with pytest.raises(ValueError, match=r"neuslice.Profile.score: unknown metric 'taylr'; expected one of "
                                         r"\('avg', 'var', 'taylor', 'deeplift', 'ens'\)"):
        p.score("taylr")
    p.metrics = ("avg", "var", "taylor")
    with pytest.raises(ValueError, match=r"metric 'ens' needs the statistic\(s\) \['deeplift_sum'\], but this "
                                         r"profile kept only \['count', 'act_sum', 'act_sq', 'taylor_sum'\] \(it was "
                                         r"made for metrics \('avg', 'var', 'taylor'\)"):
        p.score("ens")
    for s in STATS:
        p.stats["l"][s].zero_()
    with pytest.raises(ValueError, match="class_agnostic: the profile holds no sample"):
        p.class_agnostic("avg")
    assert math.isnan(float(p.score("avg")["l"][0, 0]))


@pytest.mark.parametrize("metrics, kept", [
    (("avg",), ("count", "act_sum")), (("var",), ("count", "act_sum", "act_sq")), (("taylor",), ("count", "taylor_sum")),
    (("deeplift",), ("count", "deeplift_sum")), (("ens",), STATS)])
def test_a_profile_keeps_only_the_statistics_its_metrics_need(metrics, kept, tmp_path):
    """docs/method.md §3: memory in proportion to what is asked; what is not kept is refused by name, in score,
    slicing and in the file (which holds only the kept statistics and loads back)."""
    model, loader = trained(), small_loader(40, 20)
    prof = neuslice.profile(model, loader, 10, metrics=metrics, progress=False)
    assert prof.statistics == kept and all(tuple(st) == kept for st in prof.stats.values())
    full = neuslice.profile(model, loader, 10, metrics=("ens",), progress=False)
    for m in neuslice.METRICS:
        if all(s in kept for s in neuslice.engine.metrics.NEEDS[m]):
            for n in prof.layer_names:                                  # the same numbers as keeping all
                torch.testing.assert_close(prof.score(m)[n], full.score(m)[n], equal_nan=True)
        else:
            with pytest.raises(ValueError, match=rf"metric '{m}' needs the statistic\(s\)"):
                prof.score(m)
            with pytest.raises(ValueError, match=rf"metric '{m}' needs the statistic\(s\)"):
                neuslice.global_slice(prof, m, ratio=0.5)
    prof.save(tmp_path / "p.nsp")
    back = Profile.load(tmp_path / "p.nsp", model)
    assert back.statistics == kept
    for n in prof.layer_names:
        for s in kept:
            assert torch.equal(back.stats[n][s], prof.stats[n][s])
    assert (prof + back).statistics == kept


def test_files_with_every_statistic_still_load_and_merge_with_kept_ones(tmp_path):
    """Files of older versions hold all five statistics whatever the metrics: they load as they are; their
    gradient statistics count only for the metrics collected; a sum with a newer profile keeps the common ones."""
    p = _synthetic()
    p.metrics = ("avg", "var")
    p.deeplift = None
    for e in p.layers:
        e["deeplift"] = None
    p.save(tmp_path / "old.nsp")
    old = Profile.load(tmp_path / "old.nsp")
    assert old.statistics == STATS
    torch.testing.assert_close(old.score("var")["l"], p.score("var")["l"], equal_nan=True)
    with pytest.raises(ValueError, match=r"metric 'taylor' needs the statistic\(s\) \['taylor_sum'\], but this "
                                         r"profile kept only \['count', 'act_sum', 'act_sq'\]"):
        old.score("taylor")
    new = Profile(old.layers, old.class_names, {"l": {s: old.stats["l"][s].clone() for s in STATS[:3]}},
                  metrics=("avg", "var"), target="logit", deeplift=None)
    both = old + new
    assert both.statistics == STATS[:3]
    torch.testing.assert_close(both.stats["l"]["act_sq"], 2 * old.stats["l"]["act_sq"])
    with pytest.raises(ValueError, match=r"every layer must hold count and the same statistics"):
        Profile(old.layers, old.class_names, {"l": {"act_sum": old.stats["l"]["act_sum"]}}, metrics=("avg",),
                target="logit", deeplift=None)
