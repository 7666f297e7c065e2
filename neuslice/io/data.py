"""Data sets users bring to the ``neuslice`` command, read without pickles.

Formats (``load_data(spec)``):

- ``digits`` / ``digits:train`` / ``digits:test`` / ``digits:all``: scikit-learn's bundled digits.
- MNIST-family IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST): the path of a
  ``*-images-idx3-ubyte[.gz]`` file (its labels file is the same name with ``labels-idx1``), or a
  folder that holds exactly one such pair.
- ``.npz`` with arrays ``x`` ``[N, ...]`` and ``y`` ``[N]`` (integers); an optional ``classes`` array of names.
- an image folder tree: one sub-folder per class (sorted names are the classes), images inside
  (read with Pillow; every image must have the size of the first, and at most
  :data:`MAX_IMAGE_PIXELS` pixels: a larger image, such as a decompression bomb, is refused from its
  header before it is decoded).

Images become float32 ``[N, C, H, W]`` (``[N, 1, H, W]`` for grey images) scaled to [0, 1] when stored
as bytes; labels int64 ``[N]``. An ``.npz`` ``x`` of shape ``[N, H, W]`` is read as grey images
``[N, 1, H, W]`` (a note in :attr:`Dataset.notes` says so). A malformed file raises
:class:`DataFileError` naming the file and the problem. Float inputs that look neither scaled to [0, 1]
nor standardised give a :class:`UnscaledDataWarning`; ``normalize=(mean, std)`` (or
:meth:`Dataset.normalize`) standardises per channel, and ``classes=`` (or :meth:`Dataset.subset`) keeps a
class subset with its class ids.

"""
from __future__ import annotations

import gzip
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .._errors import NeusliceError
from .digits import DIGITS_CLASSES, load_digits

__all__ = ["DataFileError", "UnscaledDataWarning", "Dataset", "parse_normalize", "load_data", "data_paths", "read_idx", "load_idx_pair", "load_npz",
           "load_image_folder", "parse_classes", "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
# the largest image of an image folder, in pixels (4096 x 4096): checked from the header, before decoding
MAX_IMAGE_PIXELS = 4096 * 4096

# IDX type codes (big-endian payload): code -> numpy dtype
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataFileError(NeusliceError, ValueError):
    """A data file is malformed (bad magic number, truncated, counts that disagree, labels out of range)."""


class UnscaledDataWarning(UserWarning):
    """Float inputs whose range says they were neither scaled to [0, 1] nor standardised."""


@dataclass
class Dataset:
    """Inputs float32 ``x [N, ...]``, labels int64 ``y [N]``, K class names, where it came from, and notes on
    how it was read (e.g. ``[N, H, W]`` taken as grey images ``[N, 1, H, W]``)."""
    x: torch.Tensor
    y: torch.Tensor
    class_names: List[str]
    source: str
    notes: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def loader(self, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(TensorDataset(self.x, self.y), batch_size=batch_size, shuffle=shuffle, generator=gen)

    def subset(self, classes: Sequence[int]) -> "Dataset":
        """The samples labelled in ``classes`` (class indices); labels keep their class ids."""
        keep = torch.isin(self.y, torch.as_tensor(list(classes), dtype=torch.int64))
        return Dataset(self.x[keep], self.y[keep], self.class_names, f"{self.source} (classes {list(classes)})",
                       list(self.notes))

    def normalize(self, mean, std) -> "Dataset":
        """``(x - mean) / std`` per channel (axis 1): ``mean``/``std`` are numbers (every channel) or sequences of
        one value per channel. Returns a new Dataset."""
        m, s = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in (mean, std))
        channels = self.x.shape[1] if self.x.dim() >= 2 else 1
        for name, v in (("mean", m), ("std", s)):
            if v.numel() not in (1, channels):
                raise ValueError(f"{self.source}: normalize {name} has {v.numel()} values; the data has {channels} "
                                 f"channel(s) (x {list(self.x.shape)}): give 1 or {channels}")
        if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"{self.source}: normalize needs finite means and stds > 0, got {m.tolist()}, {s.tolist()}")
        shape = [1, -1] + [1] * (self.x.dim() - 2)
        x = (self.x - m.view(shape)) / s.view(shape) if self.x.dim() >= 2 else (self.x - m) / s
        return Dataset(x, self.y, self.class_names, self.source,
                       self.notes + [f"normalized with mean {m.tolist()} and std {s.tolist()}"])


def _fail(path, problem: str) -> DataFileError:
    return DataFileError(f"{os.fspath(path)}: {problem}")


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise _fail(path, f"not a valid gzip file ({e})") from None
    return raw


def read_idx(path, ndim: int) -> np.ndarray:
    """The array of an IDX file (optionally gzipped) with ``ndim`` dimensions; checks magic and length."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise _fail(path, f"truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise _fail(path, f"bad magic number 0x{raw[:4].hex()}: an IDX file starts with 0x0000, a type code "
                          f"(0x08 for unsigned bytes) and the number of dimensions")
    if raw[3] != ndim:
        raise _fail(path, f"bad magic number 0x{raw[:4].hex()}: it declares {raw[3]} dimensions, expected {ndim} "
                          f"({'images' if ndim == 3 else 'labels'} file)")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise _fail(path, f"truncated: the header needs {head} bytes, the file has {len(raw)}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_TYPES[raw[2]]
    want = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - head != want:
        what = "truncated" if len(raw) - head < want else "too long"
        raise _fail(path, f"{what}: the header declares {'x'.join(map(str, dims))} values ({want} bytes of data), "
                          f"the file holds {len(raw) - head} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)


def _labels_path(images: Path) -> Path:
    name = images.name
    if "images-idx3" not in name:
        raise _fail(images, "not an IDX images file name: expected '*-images-idx3-ubyte[.gz]'")
    for cand in (name.replace("images-idx3", "labels-idx1"),):
        for variant in (cand, cand[:-3] if cand.endswith(".gz") else cand + ".gz"):
            if (images.parent / variant).is_file():
                return images.parent / variant
    raise FileNotFoundError(f"{images}: its labels file {name.replace('images-idx3', 'labels-idx1')} "
                            f"is not in {images.parent}")


def _as_images(path, arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32, copy=True))
    if arr.dtype == np.uint8:
        x /= 255.0
    if not torch.isfinite(x).all():
        raise _fail(path, "holds non-finite values (NaN or infinity)")
    return x


def _labels(path, arr: np.ndarray) -> torch.Tensor:
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise _fail(path, f"labels must be a 1-D integer array, got {arr.dtype} with shape {list(arr.shape)}")
    if arr.size and int(arr.min()) < 0:
        raise _fail(path, f"label {int(arr.min())} is negative")
    return torch.from_numpy(arr.astype(np.int64))


def load_idx_pair(images) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(x [N, 1, H, W], y [N], labels path)`` from an IDX images file and its labels file beside it."""
    images = Path(images)
    labels = _labels_path(images)
    x = _as_images(images, read_idx(images, 3))
    y = _labels(labels, read_idx(labels, 1))
    if x.shape[0] != y.shape[0]:
        raise DataFileError(f"{images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} labels: "
                            "the counts disagree")
    return x.unsqueeze(1), y, str(labels)


def load_npz(path) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[str]]]:
    """``(x, y, class names or None)`` from an ``.npz`` with ``x`` ``[N, ...]`` and ``y`` ``[N]`` (no pickles), as
    stored (see :func:`load_data` for ``[N, H, W]``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise _fail(path, f"lacks the array(s) {missing}; expected 'x' [N, ...] and 'y' [N] "
                                  f"(found {sorted(z.files)})")
            x, y = z["x"], z["y"]
            names = [str(c) for c in z["classes"].tolist()] if "classes" in z.files else None
    except DataFileError:
        raise
    except (ValueError, OSError, EOFError, zlib.error, KeyError, zipfile.BadZipFile) as e:
        raise _fail(path, f"not a readable .npz file (truncated or corrupt: {e})") from None
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise _fail(path, f"'x' must be a numeric array [N, ...] with N samples, got {x.dtype} {list(x.shape)}")
    yt = _labels(path, y)
    if x.shape[0] != yt.shape[0]:
        raise _fail(path, f"'x' holds {x.shape[0]} samples but 'y' holds {yt.shape[0]} labels: the counts disagree")
    return _as_images(path, x), yt, names


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:   # reads the header only
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise _fail(path, f"image is {w}x{h} (WxH), {w * h} pixels: more than the {MAX_IMAGE_PIXELS} "
                                  "(4096x4096) an image folder may hold (neuslice.io.data.MAX_IMAGE_PIXELS)")
            im.load()
            return im.copy()
    except Image.DecompressionBombError as e:   # Pillow's own limit, hit while opening
        raise _fail(path, f"image is too large to read ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataFileError):
            raise
        raise _fail(path, f"not a readable image ({e})") from None


def _class_images(root: Path) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """The class names of an image folder tree and its ``(image path, class index)`` pairs (nothing decoded)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise _fail(root, "holds no class folder (expected one sub-folder of images per class)")
    files: List[Tuple[Path, int]] = []
    for k, c in enumerate(classes):
        imgs = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise _fail(root / c, f"class folder holds no image (suffixes {', '.join(IMAGE_SUFFIXES)})")
        files += [(p, k) for p in imgs]
    return classes, files


def load_image_folder(root) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``(x [N, C, H, W], y [N], class names)`` from ``root/<class>/<image>``; C is 1 when every image is grey."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("neuslice.datafiles.load_image_folder: reading an image folder needs Pillow "
                          "(pip install pillow)") from None
    root = Path(root)
    classes, files = _class_images(root)
    images = [_open_image(p) for p, _ in files]
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    size = images[0].size
    arrs = []
    for (p, _), im in zip(files, images):
        if im.size != size:
            raise _fail(p, f"image is {im.size[0]}x{im.size[1]} (WxH) but {files[0][0]} is {size[0]}x{size[1]}; "
                           "every image must have the same size")
        a = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
        arrs.append(a[None] if grey else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrs).astype(np.float32)) / 255.0
    return x, torch.tensor([k for _, k in files], dtype=torch.int64), classes


def parse_classes(text: Optional[str]) -> Optional[List[str]]:
    """``--classes``: comma-separated names, or ``@FILE`` with one name per line; None stays None."""
    if text is None:
        return None
    if text.startswith("@"):
        names = [ln.strip() for ln in Path(text[1:]).read_text().splitlines() if ln.strip()]
    else:
        names = [c.strip() for c in text.split(",")]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"--classes must be distinct, non-empty names, got {names!r}")
    return names


def _idx_in_folder(root: Path) -> Optional[Path]:
    found = sorted(p for p in root.iterdir() if "images-idx3" in p.name and p.is_file())
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{root}: holds several IDX image files ({', '.join(p.name for p in found)}); "
                         "pass the path of one of them")
    return found[0]


def _digits(spec: str) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    split = spec.split(":", 1)[1] if ":" in spec else "train"
    if split not in ("train", "test", "all"):
        raise ValueError(f"data 'digits:{split}': the split must be train, test or all")
    x, y = load_digits(split)
    return x, y, list(DIGITS_CLASSES)


def parse_normalize(text: str) -> Tuple[List[float], List[float]]:
    """``--normalize``: ``"MEAN,STD"`` (every channel) or ``"M1,…,MC,S1,…,SC"`` (C means, then C stds)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or len(vals) % 2:
        raise ValueError(f"--normalize must be MEAN,STD or, per channel, M1,...,MC,S1,...,SC (an even count of "
                         f"numbers), got {text!r}")
    half = len(vals) // 2
    return vals[:half], vals[half:]


def _grey(x: torch.Tensor, source: str, notes: List[str]) -> torch.Tensor:
    """An ``.npz`` ``x [N, H, W]`` as grey images ``[N, 1, H, W]`` (noted in ``notes``)."""
    if x.dim() != 3:
        return x
    notes.append(f"{source}: x is {list(x.shape)} [N, H, W]; read as grey images {[x.shape[0], 1, *x.shape[1:]]} "
                 "[N, 1, H, W]")
    return x.unsqueeze(1)


def _check_scale(x: torch.Tensor, source: str, normalized: bool) -> None:
    """Warn when float inputs are neither in about [0, 1] nor standardised (mean about 0, std about 1)."""
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo >= -1.5 and hi <= 1.5:
        return
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    if abs(mean) <= 1.0 and std <= 2.5:
        return
    how = ("the normalisation given does not standardise it" if normalized else
           "scale it to [0, 1] (e.g. divide by 255) or standardise it (--normalize MEAN,STD; "
           "normalize=(mean, std) in Python)")
    warnings.warn(f"{source}: the inputs look unscaled: values in [{lo:.4g}, {hi:.4g}], mean {mean:.4g}, std "
                  f"{std:.4g} (expected about [0, 1], or mean 0 and std 1 when standardised); {how}",
                  UnscaledDataWarning, stacklevel=3)


def _read_any(spec: str) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[str]], str]:
    if spec == "digits" or spec.startswith("digits:"):
        x, y, names = _digits(spec)
        return x, y, names, "digits"
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such file or folder (data is 'digits[:train|test|all]', an IDX images "
                                "file, a folder of IDX files, an .npz file or an image folder tree)")
    if path.is_dir():
        idx = _idx_in_folder(path)
        if idx is None:
            x, y, names = load_image_folder(path)
            return x, y, names, str(path)
        path = idx
    if "images-idx3" in path.name:
        x, y, labels = load_idx_pair(path)
        return x, y, None, labels
    if path.suffix == ".npz":
        x, y, names = load_npz(path)
        return x, y, names, str(path)
    if "labels-idx1" in path.name:
        raise ValueError(f"{path}: give the images file (*-images-idx3-ubyte), not the labels file")
    raise ValueError(f"{path}: unknown data format (expected *-images-idx3-ubyte[.gz], .npz, or a folder)")


def data_paths(spec: str) -> List[Path]:
    """The files ``load_data(spec)`` reads (none for ``digits``), for refusing to write over them; a spec it
    cannot resolve gives what it can (the path itself), never an error (``load_data`` reports those)."""
    if spec == "digits" or spec.startswith("digits:"):
        return []
    path = Path(spec)
    try:
        if path.is_dir():
            idx = _idx_in_folder(path)
            if idx is None:
                return [p for p, _ in _class_images(path)[1]]
            path = idx
        if "images-idx3" in path.name:
            return [path, _labels_path(path)]
    except (OSError, ValueError):
        pass
    return [path]


def load_data(spec: str, class_names: Optional[Sequence[str]] = None, *, normalize=None,
              classes: Optional[Sequence[int]] = None) -> Dataset:
    """Read data set ``spec`` (see the module doc). ``class_names`` declares the K classes: a label ``>= K``
    is then an error naming the file; without it the file's own names, else ``0 … max label``.

    ``normalize``: ``(mean, std)``, numbers or per-channel sequences (:meth:`Dataset.normalize`). ``classes``:
    class indices to keep (:meth:`Dataset.subset`; labels keep their class ids). An ``.npz`` ``x [N, H, W]``
    becomes ``[N, 1, H, W]`` (see ``notes``); float inputs that look unscaled warn
    (:class:`UnscaledDataWarning`)."""
    x, y, names, labels_src = _read_any(spec)
    notes: List[str] = []
    if spec.endswith(".npz"):
        x = _grey(x, spec, notes)
    if y.numel() == 0:
        raise _fail(labels_src, "holds no sample")
    top = int(y.max())
    declared = list(class_names) if class_names is not None else names
    if declared is not None and top >= len(declared):
        shown = f"{declared[:12]}{' …' if len(declared) > 12 else ''}"
        raise _fail(labels_src, f"label {top} is outside the declared classes: {len(declared)} classes {shown} "
                                f"allow labels 0…{len(declared) - 1}")
    if declared is None:
        declared = [str(k) for k in range(top + 1)]
    ds = Dataset(x, y, [str(c) for c in declared], spec, notes)
    if classes is not None:
        ds = ds.subset(classes)
        if ds.y.numel() == 0:
            raise _fail(labels_src, f"holds no sample of the classes {list(classes)}")
    if normalize is not None:
        ds = ds.normalize(*normalize)
    _check_scale(ds.x, spec, normalize is not None)
    return ds
