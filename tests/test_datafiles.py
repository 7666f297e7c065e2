"""Data and model files users bring: IDX, .npz, image folders, weights; malformed files get clear errors."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from neuslice.io.data import DataFileError, load_data, parse_classes, read_idx
from neuslice.io.modelfile import load_model, read_weights, save_model
from neuslice.models import build

RNG = np.random.default_rng(0)


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def write_mnist(folder, n=6, h=5, w=4, labels=None, prefix="train", gz=False, img_count=None):
    folder.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, size=(n if img_count is None else img_count, h, w), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 3 if labels is None else np.asarray(labels, dtype=np.uint8)
    ext = ".gz" if gz else ""
    ip, lp = folder / f"{prefix}-images-idx3-ubyte{ext}", folder / f"{prefix}-labels-idx1-ubyte{ext}"
    opener = gzip.compress if gz else (lambda b: b)
    ip.write_bytes(opener(idx_bytes(images)))
    lp.write_bytes(opener(idx_bytes(labels)))
    return ip, lp, images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_pair_loads_scaled_images_and_labels(tmp_path, gz):
    ip, _, images, labels = write_mnist(tmp_path, gz=gz)
    for spec in (str(ip), str(tmp_path)):            # the images file, or the folder holding the pair
        ds = load_data(spec)
        assert ds.x.shape == (6, 1, 5, 4) and ds.x.dtype == torch.float32
        assert torch.allclose(ds.x[:, 0], torch.from_numpy(images).float() / 255)
        assert ds.y.tolist() == labels.tolist() and ds.class_names == ["0", "1", "2"]
    assert load_data(str(ip), ["a", "b", "c", "d"]).class_names == ["a", "b", "c", "d"]


def test_idx_bad_magic_names_the_file(tmp_path):
    ip, _, _, _ = write_mnist(tmp_path)
    raw = bytearray(ip.read_bytes())
    raw[0] = 0x12
    ip.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte: bad magic number 0x1200"):
        load_data(str(ip))


def test_idx_wrong_dimensions_and_type_code(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    p.write_bytes(idx_bytes(np.zeros((2, 3), np.uint8)))
    with pytest.raises(DataFileError, match="declares 2 dimensions, expected 3"):
        read_idx(p, 3)
    p.write_bytes(bytes([0, 0, 0x07, 3]) + b"\0" * 12)
    with pytest.raises(DataFileError, match="bad magic number 0x00000703"):
        read_idx(p, 3)


@pytest.mark.parametrize("cut,what", [(-5, "truncated"), (None, "too long"), (10, "truncated: the header")])
def test_idx_truncated_or_too_long(tmp_path, cut, what):
    ip, _, _, _ = write_mnist(tmp_path)
    raw = ip.read_bytes()
    ip.write_bytes(raw + b"\0" if cut is None else raw[:cut])
    with pytest.raises(DataFileError, match=what):
        load_data(str(ip))


def test_idx_counts_disagree(tmp_path):
    ip, lp, _, _ = write_mnist(tmp_path, n=6, img_count=5)
    with pytest.raises(DataFileError, match=r"holds 5 images but .*labels-idx1-ubyte holds 6 labels"):
        load_data(str(ip))


def test_idx_label_outside_declared_classes(tmp_path):
    ip, lp, _, _ = write_mnist(tmp_path, labels=[0, 1, 2, 3, 1, 0])
    with pytest.raises(DataFileError, match=r"labels-idx1-ubyte: label 3 is outside the declared classes: 3"):
        load_data(str(ip), ["a", "b", "c"])


def test_idx_corrupt_gzip_and_missing_labels(tmp_path):
    ip, lp, _, _ = write_mnist(tmp_path, gz=True)
    ip.write_bytes(ip.read_bytes()[:20])
    with pytest.raises(DataFileError, match="not a valid gzip file"):
        load_data(str(ip))
    lp.unlink()
    with pytest.raises(FileNotFoundError, match="labels file"):
        load_data(str(ip))


def test_idx_folder_with_two_sets_is_ambiguous(tmp_path):
    write_mnist(tmp_path, prefix="train")
    write_mnist(tmp_path, prefix="t10k")
    with pytest.raises(ValueError, match="several IDX image files"):
        load_data(str(tmp_path))
    assert load_data(str(tmp_path / "t10k-images-idx3-ubyte")).x.shape[0] == 6


def test_npz_loads_with_its_class_names(tmp_path):
    p = tmp_path / "d.npz"
    x = RNG.random((5, 2, 3, 3)).astype(np.float32)
    np.savez(p, x=x, y=np.array([0, 1, 1, 0, 1]), classes=np.array(["cat", "dog"]))
    ds = load_data(str(p))
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.class_names == ["cat", "dog"]
    np.savez(p, x=(x * 255).astype(np.uint8), y=np.array([0, 1, 1, 0, 1]))
    assert float(load_data(str(p)).x.max()) <= 1.0


@pytest.mark.parametrize("arrays,match", [
    (dict(x=np.zeros((3, 4), np.float32)), r"lacks the array\(s\) \['y'\]"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.zeros(4, np.int64)), "'x' holds 3 samples but 'y' holds 4 labels"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.zeros(3, np.float32)), "labels must be a 1-D integer array"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.array([0, -1, 0])), "label -1 is negative"),
    (dict(x=np.array([["a"]] * 3), y=np.zeros(3, np.int64)), "'x' must be a numeric array"),
])
def test_npz_malformed(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataFileError, match=f"bad.npz: {match}"):
        load_data(str(p))


def test_npz_truncated_and_pickled(tmp_path):
    p = tmp_path / "t.npz"
    np.savez(p, x=np.zeros((3, 4), np.float32), y=np.zeros(3, np.int64))
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(DataFileError, match="t.npz: not a readable .npz file"):
        load_data(str(p))
    np.savez(p, x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, np.int64))
    with pytest.raises(DataFileError, match="t.npz: not a readable .npz file"):
        load_data(str(p))


def test_npz_label_outside_declared_classes(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((3, 4), np.float32), y=np.array([0, 2, 1]), classes=np.array(["a", "b"]))
    with pytest.raises(DataFileError, match="d.npz: label 2 is outside the declared classes"):
        load_data(str(p))


def _png(path, arr):
    from PIL import Image
    Image.fromarray(arr).save(path)


def test_image_folder_tree(tmp_path):
    pytest.importorskip("PIL")
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            _png(tmp_path / c / f"{i}.png", np.full((6, 5), 40 * i + (c == "dog") * 100, np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_data(str(tmp_path))
    assert ds.x.shape == (4, 1, 6, 5) and ds.class_names == ["cat", "dog"] and ds.y.tolist() == [0, 0, 1, 1]
    assert abs(float(ds.x[3, 0, 0, 0]) - 140 / 255) < 1e-6
    _png(tmp_path / "dog" / "rgb.png", np.zeros((6, 5, 3), np.uint8))
    assert load_data(str(tmp_path)).x.shape == (5, 3, 6, 5)


def test_image_folder_malformed(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "0.png", np.zeros((6, 5), np.uint8))
    _png(tmp_path / "a" / "1.png", np.zeros((7, 5), np.uint8))
    with pytest.raises(DataFileError, match=r"1.png: image is 5x7 \(WxH\) but .*0.png is 5x6"):
        load_data(str(tmp_path))
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataFileError, match="1.png: not a readable image"):
        load_data(str(tmp_path))
    (tmp_path / "a" / "1.png").unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataFileError, match="class folder holds no image"):
        load_data(str(tmp_path))


def test_digits_and_unknown_specs(tmp_path):
    assert load_data("digits:test").x.shape == (450, 1, 8, 8)
    with pytest.raises(ValueError, match="the split must be"):
        load_data("digits:valid")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_data(str(tmp_path / "nothing.npz"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unknown data format"):
        load_data(str(tmp_path / "x.csv"))


def test_parse_classes(tmp_path):
    assert parse_classes("a, b,c") == ["a", "b", "c"]
    (tmp_path / "names.txt").write_text("zero\none\n\n")
    assert parse_classes(f"@{tmp_path / 'names.txt'}") == ["zero", "one"]
    with pytest.raises(ValueError, match="distinct"):
        parse_classes("a,a")


# ---------------------------------------------------------------------------------------------
# model files

def test_weights_state_dict_and_safetensors(tmp_path):
    model = build("digits_mlp", seed=1)
    x = torch.rand(3, 1, 8, 8)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("w.pt", "w.safetensors", "ckpt.pt"):
        loaded = load_model("digits_mlp", tmp_path / name)
        assert torch.equal(loaded(x), model(x))
    loaded = load_model("neuslice.models:MLP", tmp_path / "w.pt")
    assert torch.equal(loaded(x), model(x))


def test_pickled_module_is_refused(tmp_path):
    torch.save(build("digits_mlp"), tmp_path / "module.pt")
    with pytest.raises(DataFileError, match="module.pt: not a safetensors file nor a state dict"):
        read_weights(tmp_path / "module.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(DataFileError, match="holds a list, not a state dict"):
        read_weights(tmp_path / "list.pt")


def test_weights_errors(tmp_path):
    save_file(build("digits_mlp").state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not fit the model 'digits_cnn'"):
        load_model("digits_cnn", tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(DataFileError, match="t.safetensors: not a valid safetensors file"):
        read_weights(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        load_model("no_such_pkg.mod:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_model("neuslice.models:nope")
    with pytest.raises(ValueError, match="--model is required"):
        load_model(None, tmp_path / "w.safetensors")


def test_save_model_round_trip_keeps_the_factory(tmp_path):
    model = build("digits_cnn", seed=2, num_classes=4)
    save_model(tmp_path / "m.safetensors", model, spec="digits_cnn", model_args={"num_classes": 4},
               report={"note": 1})
    back = load_model(weights=tmp_path / "m.safetensors")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(back(x), model.eval()(x)) and back(x).shape == (2, 4)
    assert read_weights(tmp_path / "m.safetensors")[1]["report"] == {"note": 1}
