"""docs/method.md §5: safetensors files (round trips, signature check, corrupt/truncated files, atomic save) and
Profile addition."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

import neuslice
from neuslice import Profile, Slices
from neuslice.engine.slices import STATS
from slicing_fixtures import F32, small_loader, trained

K = 10


@pytest.fixture(scope="module")
def prof():
    return neuslice.profile(trained(), small_loader(120, 40), K, progress=False,
                            class_names=[f"digit{i}" for i in range(K)])


def _same_profile(a: Profile, b: Profile):
    assert a.layers == b.layers and a.class_names == b.class_names and a.metrics == b.metrics
    assert (a.target, a.deeplift, a.num_batches, a.coupled) == (b.target, b.deeplift, b.num_batches, b.coupled)
    for n in a.layer_names:
        for s in STATS:
            assert torch.equal(a.stats[n][s], b.stats[n][s]), (n, s)


def test_profile_round_trip(prof, tmp_path):
    path = tmp_path / "p.safetensors"
    prof.save(path)
    _same_profile(prof, Profile.load(path, model=trained()))
    with safe_open(str(path), "pt") as f:                          # a plain safetensors file
        assert "neuslice" in f.metadata() and len(list(f.keys())) == 2 * len(STATS)
    assert [p for p in os.listdir(tmp_path)] == ["p.safetensors"]


def test_slices_round_trip(prof, tmp_path):
    for s in (neuslice.semantic_slice(prof, "ens", 0.95, share=0.6, tau=0.4, min_keep=2),
              neuslice.global_slice(prof, "taylor", 0.3)):
        path = tmp_path / f"{s.mode}.safetensors"
        s.save(path)
        t = Slices.load(path, model=trained())
        assert (t.mode, t.metric, t.value, t.share, t.tau, t.min_keep) == (s.mode, s.metric, s.value, s.share,
                                                                           s.tau, s.min_keep)
        assert t.class_names == s.class_names and torch.equal(t.sliced, s.sliced)
        for n in s.layer_names:
            assert torch.equal(t.critical_sets[n], s.critical_sets[n])
            assert torch.equal(t.scores[n], s.scores[n])
        assert t.groups() == s.groups()


def test_loading_for_another_model_names_the_layer(prof, tmp_path):
    path = tmp_path / "s.safetensors"
    neuslice.semantic_slice(prof, "taylor", 0.9).save(path)
    other = trained("digits_cnn", channels=(16, 24))
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.Slices.load: the file was made for another model: "
                                                      r"layer 'features.4' is Conv2d with weight \[32, 16, 3, 3\] "
                                                      r"in the file but Conv2d with weight \[24, 16, 3, 3\]"):
        Slices.load(path, model=other)
    with pytest.raises(neuslice.SignatureError, match=r"Profile.load: .*layer 'features.0' \(Conv2d with weight "
                                                      r"\[16, 1, 3, 3\]\) is not in this model"):
        prof.save(tmp_path / "p.safetensors")
        Profile.load(tmp_path / "p.safetensors", model=trained("digits_mlp", epochs=5))


@pytest.mark.parametrize("damage", ["truncate_header", "truncate_data", "flip_byte", "empty", "not_safetensors"])
def test_corrupt_or_truncated_files_are_errors(prof, tmp_path, damage):
    path = tmp_path / "p.safetensors"
    prof.save(path)
    blob = path.read_bytes()
    blob = {"truncate_header": blob[:40], "truncate_data": blob[:-100], "empty": b"",
            "flip_byte": blob[:-50] + bytes([blob[-50] ^ 0x10]) + blob[-49:],
            "not_safetensors": b"\x80\x04\x95 pickle? no." * 10}[damage]
    path.write_bytes(blob)
    with pytest.raises(neuslice.FileFormatError, match=r"neuslice.Profile.load: .* is not a valid neuslice profile "
                                                       r"file \((truncated or )?corrupt"):
        Profile.load(path)


def test_wrong_kind_of_file(prof, tmp_path):
    prof.save(tmp_path / "p.safetensors")
    with pytest.raises(neuslice.FileFormatError, match=r"Slices.load: .* not a valid neuslice slices file "
                                                       r"\(it holds a 'profile'\)"):
        Slices.load(tmp_path / "p.safetensors")


def test_save_is_atomic(prof, tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    prof.save(path)
    good = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        (prof + prof).save(path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["p.safetensors"]


def test_profiles_add(prof):
    model = trained()
    x, y = next(iter(small_loader(120, 120)))
    a = neuslice.profile(model, [(x[:50], y[:50])], K, progress=False, class_names=prof.class_names)
    b = neuslice.profile(model, [(x[50:], y[50:])], K, progress=False, class_names=prof.class_names)
    both = a + b
    assert both.num_batches == 2
    for n in prof.layer_names:
        for s in STATS:
            torch.testing.assert_close(both.stats[n][s], prof.stats[n][s], **F32)
            assert torch.equal((a + b).stats[n][s], (b + a).stats[n][s])
    with pytest.raises(ValueError, match=r"Profile.__add__: the profiles differ in metrics"):
        a + neuslice.profile(model, [(x, y)], K, metrics=("avg",), progress=False, class_names=prof.class_names)
    with pytest.raises(ValueError, match=r"Profile.__add__: the profiles are of different layers"):
        a + neuslice.profile(model, [(x, y)], K, layers=["features.0"], progress=False, class_names=prof.class_names)
    with pytest.raises(TypeError, match=r"Profile.__add__: expected a Profile, got int"):
        a + 1
