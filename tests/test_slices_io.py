"""docs/method.md §5: safetensors files (round trips, signature check, corrupt/truncated files, atomic save) and
Profile addition."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

import neuslice
from neuslice import Profile, Slices
from neuslice.engine.slices import STATS
from neuslice.io import container
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


# -- docs/method.md §5: files that cannot lie ----------------------------------------------------------

def _doc_of(path):
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return blob, n, json.loads(json.loads(blob[8:8 + n])["__metadata__"]["neuslice"])


def _rewrite(path, edit, *, reseal=True):
    """Rewrite ``path`` with its metadata document changed by ``edit(doc)``; re-hash it unless told not to."""
    blob, n, doc = _doc_of(path)
    edit(doc)
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["neuslice"] = json.dumps(doc)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    blob = len(text).to_bytes(8, "little") + text + blob[8 + n:]
    path.write_bytes(container.seal(blob) if reseal else blob)


@pytest.fixture(scope="module")
def sl(prof):
    return neuslice.semantic_slice(prof, "ens", 0.95, share=0.6, tau=0.4, min_keep=2)


def test_the_checksum_covers_the_metadata(prof, sl, tmp_path):
    for obj, load in ((prof, Profile.load), (sl, Slices.load)):
        path = tmp_path / "f.safetensors"
        obj.save(path)
        blob = path.read_bytes()
        key = b'\\"num_batches\\": 3' if obj is prof else b'\\"share\\": 0.6'
        assert blob.count(key) == 1
        path.write_bytes(blob.replace(key, key[:-1] + (b"4" if obj is prof else b"7")))
        with pytest.raises(neuslice.FileFormatError, match=r"\.load: '.*f\.safetensors' is not a valid neuslice "
                                                           r".* \(corrupt: the file does not match its sha256"):
            load(path)
        _rewrite(path, lambda d: None, reseal=False)           # re-serialised without re-hashing
        with pytest.raises(neuslice.FileFormatError, match=r"does not match its sha256"):
            load(path)


_SLICES_BAD = [
    ("value", 0, r"field 'value' must be a number in \(0, 1\], got 0"),
    ("value", 1.5, r"field 'value' must be a number in \(0, 1\]"),
    ("value", "0.9", r"field 'value' must be a number"),
    ("share", -0.1, r"field 'share' must be a number in \[0, 1\]"),
    ("tau", 2, r"field 'tau' must be a number in \[0, 1\]"),
    ("min_keep", -1, r"field 'min_keep' must be an integer >= 0, got -1"),
    ("min_keep", 1.5, r"field 'min_keep' must be an integer"),
    ("min_keep", True, r"field 'min_keep' must be an integer >= 0, got True"),
    ("metric", "foo", r"field 'metric' must be one of \('avg'"),
    ("mode", "semantics", r"field 'mode' must be one of \('global', 'category', 'semantic'\)"),
    ("class_names", ["a", "a"] + [f"c{i}" for i in range(K - 2)], r"field 'class_names' names 'a' twice"),
    ("class_names", [1] * K, r"field 'class_names\[0\]' must be a non-empty string"),
    ("coupled", [["features.0", "nope"]], r"field 'coupled\[0\]\[1\]' must be one of \('features.0'"),
    ("coupled", [["features.0", "features.4"]], r"field 'coupled\[0\]' must name at least 2 layers of one width"),
    ("heads", [{"name": "head", "type": "Linear"}], r"field 'heads\[0\].n' is missing"),
    ("layers.0.n", 17, r"field 'layers\[0\].n' is 17 but the weight has 16 rows"),
    ("layers.0.type", None, r"field 'layers\[0\].type' must be a non-empty string"),
    ("layers.1.name", "features.0", r"field 'layers\[\].name' names 'features.0' twice"),
    ("layers.0.weight_shape", [16], r"field 'layers\[0\].weight_shape' must have 2 to 5 dimensions"),
    ("layers", [], r"field 'layers' must list at least one layer"),
    ("signature", "0" * 16, r"field 'signature' does not match the layers and heads"),
    ("-mode", None, r"field 'mode' is missing"),
    ("-layers.0.name", None, r"field 'layers\[0\].name' is missing"),
]
_PROFILE_BAD = [
    ("num_batches", -1, r"field 'num_batches' must be an integer >= 0"),
    ("num_batches", 2.0, r"field 'num_batches' must be an integer >= 0"),
    ("target", "logits", r"field 'target' must be one of \('logit', 'loss'\)"),
    ("deeplift", "shap", r"field 'deeplift' must be one of \('rescale', 'gradient'\) or null"),
    ("deeplift", None, r"field 'deeplift' is None but the metrics are"),
    ("metrics", ["avg", "avg"], r"field 'metrics' names 'avg' twice"),
    ("metrics", ["ens"], r"field 'metrics\[0\]' must be one of"),
    ("layers.0.tap_source", "guess", r"field 'layers\[0\].tap_source' must be one of"),
    ("layers.1.deeplift", None, r"field 'layers\[1\].deeplift' is None but the profile's is"),
    ("-layers.0.tap", None, r"field 'layers\[0\].tap' is missing"),
]


def _set(doc, key, value):
    path = key.lstrip("-").split(".")
    obj = doc
    for k in path[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = int(path[-1]) if isinstance(obj, list) else path[-1]
    if key.startswith("-"):
        del obj[last]
    else:
        obj[last] = value
    if key.lstrip("-").startswith("layers") or key == "heads":      # keep the signature in step: test the field
        try:
            doc["signature"] = container.signature(doc["layers"], doc["heads"])
        except (KeyError, TypeError, IndexError):
            pass


@pytest.mark.parametrize("kind,key,value,message", [("slices",) + c for c in _SLICES_BAD] +
                         [("profile",) + c for c in _PROFILE_BAD])
def test_every_field_is_validated(prof, sl, tmp_path, kind, key, value, message):
    obj, load = (sl, Slices.load) if kind == "slices" else (prof, Profile.load)
    path = tmp_path / "f.safetensors"
    obj.save(path)
    _rewrite(path, lambda d: _set(d, key, value))
    with pytest.raises(neuslice.FileFormatError, match=rf"{kind.capitalize()}\.load: '{tmp_path}/f\.safetensors' "
                                                       rf"is not a valid neuslice {kind} file: {message}"):
        load(path)


def test_tensors_are_validated(sl, tmp_path):
    path = tmp_path / "s.safetensors"
    sl.save(path)
    tensors, doc = container.read("t", path, "slices")
    meta = {k: v for k, v in doc.items() if k not in ("format_version", "kind")}
    container.write("t", path, "slices", {**tensors, "1.scores": tensors["1.scores"].float()}, meta)
    with pytest.raises(neuslice.FileFormatError, match=r"tensor '1.scores' must be \[10, 32\] torch.float64, got "
                                                       r"\[10, 32\] torch.float32"):
        Slices.load(path)
    container.write("t", path, "slices", {**tensors, "extra": torch.zeros(1)}, meta)
    with pytest.raises(neuslice.FileFormatError, match=r"s\.safetensors' is not a valid neuslice slices file: "
                                                       r"unexpected tensor 'extra'"):
        Slices.load(path)


def test_old_format_version_is_a_clear_error(sl, tmp_path):
    """A format-1 file (its sha256 covered the payload only) is named as such."""
    path = tmp_path / "old.safetensors"
    sl.save(path)
    tensors, doc = container.read("t", path, "slices")
    doc["format_version"] = 1
    blob = save(tensors, metadata={"neuslice": json.dumps(doc)})
    n = int.from_bytes(blob[:8], "little")
    path.write_bytes(save(tensors, metadata={"neuslice": json.dumps(doc),
                                             "sha256": hashlib.sha256(blob[8 + n:]).hexdigest()}))
    with pytest.raises(neuslice.FileFormatError, match=r"old\.safetensors' is not a valid neuslice slices file "
                                                       r"\(corrupt: .*written by an older neuslice in format version "
                                                       r"1, which this neuslice no longer reads: re-create it"):
        Slices.load(path)


# -- signatures: names, types, order, widths and the head ----------------------------------------------

def _mlp(extra=False, swap=False):
    torch.manual_seed(0)
    mods = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)]
    if extra:
        mods += [nn.ReLU(), nn.Linear(3, 3)]
    return nn.Sequential(*mods)


class _Two(nn.Module):
    def __init__(self, swap: bool):
        super().__init__()
        torch.manual_seed(0)
        if swap:                                  # the same modules, registered (and so ordered) differently
            self.b, self.a = nn.Linear(8, 8), nn.Linear(8, 8)
        else:
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_signature_covers_the_head_and_the_order(tmp_path):
    x, y = torch.randn(30, 8), torch.arange(30) % 3
    prof_a = neuslice.profile(_mlp(), [(x, y)], 3, progress=False)
    s = neuslice.semantic_slice(prof_a, "taylor", 0.9)
    assert s.heads == [{"name": "4", "type": "Linear", "n": 3}]
    s.save(tmp_path / "s.safetensors")
    prof_a.save(tmp_path / "p.safetensors")
    Slices.load(tmp_path / "s.safetensors", _mlp())
    head = (r"the file was made for another model: head is '4' \(Linear, 3 outputs\) in the file but '6' "
            r"\(Linear, 3 outputs\) in this model")
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.Slices.load: " + head):
        Slices.load(tmp_path / "s.safetensors", _mlp(extra=True))
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.Profile.load: " + head):
        Profile.load(tmp_path / "p.safetensors", _mlp(extra=True))
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.Slices.apply: " + head):
        s.apply(_mlp(extra=True), [0])
    with pytest.raises(neuslice.SignatureError, match=r"neuslice.restructure: " + head):
        neuslice.restructure(_mlp(extra=True), s, [0], mode="mask")
    p2 = neuslice.profile(_Two(False), [(x, y)], 3, metrics=("taylor",), progress=False)
    s2 = neuslice.semantic_slice(p2, "taylor", 0.9)
    with pytest.raises(neuslice.SignatureError, match=r"Slices.apply: .*: sliced layer 1 is 'a' \(Linear with "
                                                      r"weight \[8, 8\], 8 neurons\) in the file but 'b'"):
        s2.apply(_Two(True), [0])


# -- writes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask(sl, tmp_path, umask):
    old = os.umask(umask)
    try:
        sl.save(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.safetensors").st_mode) == 0o666 & ~umask


def test_saving_over_a_symlink_writes_its_target(sl, prof, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "s.safetensors"
    prof.save(target)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    sl.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert Slices.load(target).signature == sl.signature
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "real" / "new.safetensors")
    sl.save(dangling)
    assert dangling.is_symlink() and (tmp_path / "real" / "new.safetensors").is_file()
    assert sorted(os.listdir(tmp_path / "real")) == ["new.safetensors", "s.safetensors"]


def test_write_errors_name_the_users_path(sl, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"neuslice.Slices.save: cannot write '.*/nope/s.safetensors': "
                                                r"No such file or directory$"):
        sl.save(tmp_path / "nope" / "s.safetensors")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"Slices.save: cannot write '.*/s.safetensors': No space left") as e:
        sl.save(tmp_path / "s.safetensors")
    assert ".neuslice-" not in str(e.value) and e.value.__cause__ is None and e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_stale_temp_files_of_dead_writers_are_removed(sl, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".neuslice-{dead.pid}-0a1b2c.tmp", f".neuslice-{alive.pid}-0a1b2c.tmp",
                 f".neuslice-{os.getpid()}-0a1b2c.tmp", ".neuslice-x.tmp", "other.tmp"]
        for n in names:
            (tmp_path / n).write_bytes(b"partial")
        sl.save(tmp_path / "s.safetensors")
        assert sorted(os.listdir(tmp_path)) == sorted(names[1:] + ["s.safetensors"])
    finally:
        alive.kill()
        alive.wait()


# -- reads: regular files only, bounded ---------------------------------------------------------------

def _load_in_thread(path):
    out = {}

    def run():
        try:
            Slices.load(path)
        except BaseException as e:      # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), f"loading {path} blocked"
    return out.get("error")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_non_regular_files_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", "/dev/zero", tmp_path):
        if not os.path.exists(path):
            continue
        e = _load_in_thread(path)
        assert isinstance(e, neuslice.FileFormatError), e
        assert str(e) == f"neuslice.Slices.load: {str(path)!r} is not a regular file"
    with pytest.raises(FileNotFoundError, match=r"Slices.load: cannot read '.*/missing': No such file"):
        Slices.load(tmp_path / "missing")


def test_reads_stop_at_the_size_stat_reported(sl, tmp_path, monkeypatch):
    """A file that grows while it is read (or lies about its size) is read only up to its stat size."""
    path = tmp_path / "s.safetensors"
    sl.save(path)
    real = os.fstat

    def small(fd):
        st = list(real(fd))
        st[stat.ST_SIZE] = 100
        return os.stat_result(st)

    monkeypatch.setattr(os, "fstat", small)
    with pytest.raises(neuslice.FileFormatError, match=r"a header of \d+ bytes in a file of 100 bytes"):
        Slices.load(path)
