"""Data sources for calibration, fine-tuning and evaluation, streamed through one preprocessing pipeline.

``open_dataset(path, preprocess)`` recognizes four kinds of source:

* an ImageFolder tree (one sub-folder per class, its images found at any depth; labels are the sorted folder
  names' indices),
* a flat folder of images (unlabeled; enough for calibration and BN re-estimation),
* an IDX folder (MNIST / Fashion-MNIST layout, gzipped or not, e.g. ``/usr/share/datasets/fashion-mnist``),
* an ``.npz`` file with ``x`` (N,H,W | N,H,W,C | N,C,H,W; raw pixels: uint8, 16-bit, float in [0, 1] or
  [0, 255]) and optional ``y``.

Every item goes through the same tensor pipeline (channel conversion, resize / center crop, normalize),
so a model sees identical inputs whichever way its data is stored. Image folders are decoded lazily,
item by item, in DataLoader workers: memory does not grow with the number of images.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2 import functional as TF

from rescompress.errors import DataError
from rescompress.spec import Preprocess

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ASSETS = Path(__file__).resolve().parent / "assets"
UNLABELED = -1


@dataclass(frozen=True)
class SourceInfo:
    """What a data source is, before any image is decoded."""

    path: str
    kind: str  # "imagefolder" | "images" | "idx" | "npz"
    split: str | None
    length: int
    labeled: bool
    num_classes: int | None  # classes present in the labels (None when unlabeled)
    classes: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "path": self.path, "kind": self.kind, "split": self.split, "length": self.length,
            "labeled": self.labeled, "num_classes": self.num_classes,
        }


def _trim_long_side(image: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """A very elongated image (long side over 4x the short one) cut, about its centre, to what the centre crop
    after resizing keeps plus a margin: resizing a 1x8000 banner's short side to 256 first made a 256x2M image.
    The result can differ from resizing the whole image by the rounding of the resized length (under a pixel
    of shift); images up to 4:1 are not touched."""
    h, w = image.shape[-2:]
    short, long = min(h, w), max(h, w)
    if long <= 4 * short:
        return image
    crop_long = pre.size[0] if h > w else pre.size[1]
    keep = max(short, math.ceil((crop_long + 8) * short / pre.resize) + 2)  # never shorter than the short side
    keep += (long - keep) % 2  # an even cut on both ends keeps the centre exactly where it was
    if keep >= long:
        return image
    start = (long - keep) // 2
    return image[..., start : start + keep, :] if h > w else image[..., start : start + keep]


def to_model_input(image: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (C,H,W) or (H,W) image tensor -> normalized float32 (channels, H, W) model input."""
    if image.ndim == 2:
        image = image.unsqueeze(0)
    c = image.shape[0]
    if c == 4:
        image = image[:3]
        c = 3
    if c not in (1, 3):
        raise DataError(f"images with {c} channels are not supported (expected 1, 3 or 4)")
    if pre.resize is not None:
        image = _trim_long_side(image, pre)
        image = TF.resize(image, [pre.resize], antialias=True)
        image = TF.center_crop(image, list(pre.size))
    elif tuple(image.shape[-2:]) != tuple(pre.size):
        image = TF.resize(image, list(pre.size), antialias=True)
    x = image.to(torch.float32).div_(255.0)
    # Channel conversion in float: a uint8 grey conversion would truncate and shift levels by one.
    if c == 1 and pre.channels == 3:
        x = x.expand(3, -1, -1)
    elif c == 3 and pre.channels == 1:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    mean = torch.tensor(pre.mean_per_channel, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std_per_channel, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


class ImageDataset(Dataset):
    """A preprocessed view of one source; items are ``(input_tensor, label)`` with label -1 if unlabeled."""

    def __init__(self, info: SourceInfo, preprocess: Preprocess, reader) -> None:
        self.info = info
        self.preprocess = preprocess
        self._reader = reader  # index -> (uint8 tensor C,H,W or H,W, label)

    def __len__(self) -> int:
        return self.info.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._reader(index)
        return to_model_input(image, self.preprocess), int(label)


# ----------------------------------------------------------------------------------------- readers


class _ArrayReader:
    def __init__(self, x: np.ndarray, y: np.ndarray | None) -> None:
        self.x = x
        self.y = y

    def __call__(self, i: int):
        img = torch.from_numpy(np.ascontiguousarray(self.x[i]))
        return img, (UNLABELED if self.y is None else int(self.y[i]))


# Float pixels up to this are [0, 1] data (resizing overshoots 1 by a few percent), clipped; above, [0, 255].
# A [0, 255] image whose brightest pixel is 2 would be black anyway.
FLOAT_UNIT_MAX = 2.0


def _grey_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit / 32-bit integer or float grey image scaled to 8 bits (PIL's own conversion clips at 255,
    which turns a 16-bit image white). Integer images are taken as 16-bit, float ones as [0, 1] (clipped) unless
    their values exceed ``FLOAT_UNIT_MAX`` (then [0, 255])."""
    a = a.astype(np.float64)
    if mode == "F":
        scale = 255.0 if a.size and np.nanmax(a) <= FLOAT_UNIT_MAX else 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)


class _FileReader:
    def __init__(self, files: list[Path], labels: list[int] | None) -> None:
        self.files = files
        self.labels = labels

    def __call__(self, i: int):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                if im.mode.startswith("I") or im.mode == "F":
                    img = torch.from_numpy(_grey_to_uint8(np.asarray(im), im.mode))
                else:
                    img = TF.pil_to_tensor(im.convert("L" if im.mode in ("1", "L", "LA") else "RGB"))
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        return img, (UNLABELED if self.labels is None else self.labels[i])


def _at_or_above(real: str, of: str) -> bool:
    """Whether the resolved folder ``real`` is the resolved folder ``of`` or one of its ancestors (a symlink
    there would walk the tree again)."""
    return of == real or of.startswith(real.rstrip(os.sep) + os.sep)


def _list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and, if ``recursive``, in its sub-folders at any depth, in torchvision
    ImageFolder's order: folder by folder, sorted by path, files sorted); hidden files and folders skipped."""
    listed, seen = [], set()
    start = os.path.realpath(folder)
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        # A symlink loop, a folder linked twice, or a link back to the folder or above it (it would bring in
        # the other classes' images under this one's label).
        if real in seen or (seen and _at_or_above(real, start)):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        listed.append((root, sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                                    and not n.startswith("."))))
    return [p for root, names in sorted(listed) for n in names if (p := Path(root, n)).is_file()]


# Folder names that mark a root of dataset splits (root/train/cat/...) rather than of classes.
_SPLIT_NAMES = frozenset({
    "train", "training", "val", "valid", "validation", "test", "testing", "eval", "evaluation",
    "calib", "calibration", "dev",
})


def _split_folders(subdirs: list[Path], per_class: list[list[Path]]) -> list[str]:
    """Names of the sub-folders of a folder of splits (root/{train,val}/{cat,dog}/...), else [].

    Taken as splits when every sub-folder holding images holds them only in sub-folders and either all have
    usual split names (train, val, test, ...) or at least half have and at least two class folders repeat across
    them (root/{train,val,test_set}/{cat,dog}/; root/{bus,car,train}/{day,night}/ is three classes). Other
    layouts are trees of classes, as torchvision's ImageFolder reads them (root/{bus,car,train}/flickr/ has
    three classes); when their image sub-folders repeat across
    them and outnumber them (root/{fold1,fold2}/{bird,cat,dog}/), which may be splits, a warning says so."""
    holding = [(d, files) for d, files in zip(subdirs, per_class, strict=True) if files]
    if not holding or any(f.parent == d for d, files in holding for f in files):
        return []
    names = [d.name for d, _ in holding]
    if all(n.lower() in _SPLIT_NAMES for n in names):
        return names
    inner = [{f.relative_to(d).parts[0] for f in files} for d, files in holding]
    repeated = set().union(*(a & b for a, b in combinations(inner, 2)))
    if 2 * sum(n.lower() in _SPLIT_NAMES for n in names) >= len(names) and len(repeated) >= 2:
        return names  # {train, val, test_set}/{cats, dogs}: splits, one of them oddly named
    if len(repeated) > len(holding):
        logging.getLogger(__name__).warning(
            "%s: taking %s as the classes; each holds the same sub-folders (%s), so if they are dataset splits, "
            "pass one of them instead", subdirs[0].parent, ", ".join(names[:4]), ", ".join(sorted(repeated)[:4]))
    return []


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but the file holds {arr.size} values")
    return arr.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


_IDX_SPLITS = {"train": "train", "test": "t10k"}


def _idx_files(folder: Path, split: str) -> tuple[Path, Path | None] | None:
    prefix = _IDX_SPLITS.get(split, split)
    for ext in ("", ".gz"):
        images = folder / f"{prefix}-images-idx3-ubyte{ext}"
        if images.exists():
            labels = folder / f"{prefix}-labels-idx1-ubyte{ext}"
            if not labels.exists():
                labels = folder / f"{prefix}-labels-idx1-ubyte{'.gz' if ext == '' else ''}"
            return images, (labels if labels.exists() else None)
    return None


def _normalize_array_images(x: np.ndarray, path: Path) -> np.ndarray:
    """Return uint8 images as (N,H,W) or (N,C,H,W).

    Floats are taken as [0, 1], or [0, 255] if they exceed 1; integers above 255 as 16-bit (0-65535, scaled like
    16-bit image files) or, beyond that, as the full range of their type. Negative values (already normalized
    data) and floats above 255 are refused rather than clipped."""
    if x.dtype == np.bool_:  # 1-bit images: white is 255, as PIL reads mode "1"
        x = x.astype(np.uint8) * 255
    if x.ndim == 3:
        pass
    elif x.ndim == 4:
        if x.shape[-1] == 2 and x.shape[1] not in (1, 2, 3, 4):
            raise DataError(f"{path}: 'x' of shape {x.shape} holds 2-channel images (grey + alpha?); save grey "
                            "(N,H,W) or RGB images")
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise DataError(f"{path}: 'x' must have 3 or 4 dimensions (N,H,W[,C]), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    is_float = np.issubdtype(x.dtype, np.floating)
    if is_float and not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or Inf")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < -1e-6:
        raise DataError(
            f"{path}: 'x' has negative values (min {lo:.4g}), so it looks already normalized; save raw pixels "
            "(uint8 0-255 or float 0-1): the model's own mean/std are applied when the data is read"
        )
    if is_float:
        if hi > 255.5:
            raise DataError(f"{path}: 'x' holds floats up to {hi:.6g}; expected pixels in [0, 1] or [0, 255]")
        scale = 255.0 if hi <= FLOAT_UNIT_MAX else 1.0
        return _chunked(x, lambda c: np.clip(np.rint(c * scale), 0, 255).astype(np.uint8))
    if x.dtype == np.uint16:  # 16-bit pixels, as a 16-bit image file's, whatever their largest value
        return _chunked(x, lambda c: _grey_to_uint8(c, "I;16"))
    if hi <= 255:  # e.g. int64 from np.array of Python ints holding 8-bit values
        return x.astype(np.uint8)
    if hi <= 65535:
        return _chunked(x, lambda c: _grey_to_uint8(c, "I;16"))  # the 16-bit image files' policy
    top = float(np.iinfo(x.dtype).max)
    return _chunked(x, lambda c: np.clip(np.rint(c.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8))


def _chunked(x: np.ndarray, convert, images: int = 64) -> np.ndarray:
    """``convert`` applied a few images at a time into one uint8 array: float64 temporaries of the whole
    array took 12x a 16-bit file's size in memory."""
    out = np.empty(x.shape, dtype=np.uint8)
    for i in range(0, len(x), images):
        out[i:i + images] = convert(x[i:i + images])
    return out


# ----------------------------------------------------------------------------------------- opening


def describe_source(path: Path | str, split: str = "test") -> tuple[SourceInfo, object]:
    """Recognize a data source; return its info and an item reader. Raises DataError if unusable."""
    raw = str(path)
    explicit = "@" in raw and not Path(raw).exists()
    if explicit:  # DIR@train / DIR@test chooses an IDX split
        raw, split = raw.rsplit("@", 1)
    p = Path(raw).expanduser()
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_file():
        if explicit:
            raise DataError(f"@{split} picks a split of a folder; {p} is a file")
        if p.suffix.lower() == ".npz":
            return _open_npz(p)
        raise DataError(
            f"{p} is a file of an unsupported kind; --data accepts an ImageFolder tree, a folder of images, "
            "an IDX (MNIST/Fashion-MNIST) folder or an .npz file with 'x' (and 'y')"
        )
    found = _idx_files(p, split)
    if found is None and any(p.glob("*-images-idx3-ubyte*")):
        other = [s for s in _IDX_SPLITS if _idx_files(p, s)]
        if len(other) == 1 and not explicit:
            split = other[0]
            found = _idx_files(p, split)
        elif other:
            raise DataError(f"{p} has no IDX split {split!r}; it has {', '.join(other)} (e.g. {p}@{other[0]})")
    if found is not None:
        images_path, labels_path = found
        x = _read_idx(images_path)
        y = _read_idx(labels_path) if labels_path else None
        if y is not None and len(y) != len(x):
            raise DataError(f"{p}: {len(x)} images but {len(y)} labels")
        info = SourceInfo(
            str(p), "idx", split, len(x), y is not None,
            int(y.max()) + 1 if y is not None and len(y) else None,
        )
        return info, _ArrayReader(x, None if y is None else y.astype(np.int64))
    # ImageFolder: every non-hidden sub-folder is a class, numbered in sorted order, its images found at any
    # depth (like torchvision). A class folder without images keeps its number, so the labels after it still
    # match the model's outputs.
    here = os.path.realpath(p)
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and not _at_or_above(os.path.realpath(d), here))
    if explicit:  # DIR@val: the split folder DIR/val
        match = [d for d in subdirs if d.name == split] or [d for d in subdirs if d.name.lower() == split.lower()]
        if not match:
            raise DataError(f"{p} has no IDX split or split folder {split!r} (sub-folders: "
                            f"{', '.join(d.name for d in subdirs[:6]) or 'none'})")
        return describe_source(match[0], split)
    per_class = [_list_images(d, recursive=True) for d in subdirs]
    splits = _split_folders(subdirs, per_class)
    top = _list_images(p)
    if top and any(per_class):
        holding = [d.name for d, found in zip(subdirs, per_class, strict=True) if found]
        raise DataError(
            f"{p} holds {len(top)} images directly and more in the sub-folders {', '.join(holding[:4])}: "
            "neither a tree of classes (every image in a class folder) nor a flat folder of images; move them, "
            "or pass one sub-folder"
        )
    if any(per_class) and not splits:
        files, labels = [], []
        for idx, found in enumerate(per_class):
            files += found
            labels += [idx] * len(found)
        classes = tuple(d.name for d in subdirs)
        moved = [(i, c) for i, c in enumerate(classes) if c.isdigit() and int(c) != i]
        if moved and all(c.isdigit() for c in classes) and list(classes) != sorted(classes, key=int):
            logging.getLogger(__name__).warning(
                "%s: class folders are numbered in sorted order, as torchvision does, so folder %s is class %d; "
                "if the labels are the folder numbers, rename them with leading zeros", p, moved[0][1], moved[0][0])
        info = SourceInfo(str(p), "imagefolder", None, len(files), True, len(classes), classes)
        return info, _FileReader(files, labels)
    if top:
        return SourceInfo(str(p), "images", None, len(top), False, None), _FileReader(top, None)
    if splits:  # e.g. root/{train,val}/{cat,dog}/*.jpg: a folder of splits, not of classes
        raise DataError(
            f"{p} looks like a folder of dataset splits, not of classes; {', '.join(splits[:4])} hold class "
            f"folders of images: pass one of them (a dataset split) instead, e.g. {p}@{splits[0]}"
        )
    raise DataError(
        f"{p} holds no images: expected class sub-folders of images, images directly, "
        "or IDX files (*-images-idx3-ubyte[.gz])"
    )


def _labels(y: np.ndarray, path: Path) -> np.ndarray:
    """Class indices from an .npz 'y': (N,), (N, 1), or one-hot (N, C) as Keras writes them."""
    if y.ndim == 2 and y.shape[1] > 1:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise DataError(f"{path}: 'y' of shape {y.shape} is neither class indices (N,) nor one-hot (N, C)")
        return y.argmax(axis=1).astype(np.int64)
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise DataError(f"{path}: 'y' must be class indices of shape (N,), got {y.shape}")
    y = y.astype(np.int64).reshape(-1)
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: 'y' has negative class indices (min {y.min()}); classes are numbered from 0")
    return y


def _open_npz(p: Path) -> tuple[SourceInfo, object]:
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z:
                raise DataError(f"{p}: an .npz data file needs an array 'x' (found: {', '.join(z.files)})")
            x = _normalize_array_images(z["x"], p)
            y = _labels(z["y"], p) if "y" in z else None
            other = [k for k in ("labels", "label", "targets", "target", "classes") if k in z.files]
            if y is None and other:
                raise DataError(f"{p}: the labels must be the array 'y'; found {other[0]!r} (np.savez(path, "
                                f"x=images, y=labels)), or drop it for unlabeled data")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {p}: {exc}") from exc
    if y is not None and len(y) != len(x):
        raise DataError(f"{p}: {len(x)} images in 'x' but {len(y)} labels in 'y'")
    info = SourceInfo(
        str(p), "npz", None, len(x), y is not None, int(y.max()) + 1 if y is not None and len(y) else None
    )
    return info, _ArrayReader(x, y)


def open_dataset(path: Path | str, preprocess: Preprocess, split: str = "test") -> ImageDataset:
    """Open a data source with preprocessing. ``split`` picks the IDX split when a folder has both."""
    info, reader = describe_source(path, split)
    if info.length == 0:
        raise DataError(f"{path} holds no images")
    return ImageDataset(info, preprocess, reader)


def labels_fit(info: SourceInfo, num_classes: int) -> bool:
    """Whether the data's labels can be classes of a model with ``num_classes`` outputs (unlabeled data: yes)."""
    return not (info.labeled and info.num_classes is not None and info.num_classes > max(num_classes, 2))


def check_compatible(
    info: SourceInfo, num_classes: int, require_labels: bool = False, purpose: str = "this command"
) -> None:
    """Refuse data whose labels cannot belong to a model with ``num_classes`` outputs (a single output is a
    binary classifier: labels 0 and 1)."""
    if require_labels and not info.labeled:
        raise DataError(f"{purpose} needs labeled data, but {info.path} ({info.kind}) has no labels")
    outputs, num_classes = num_classes, max(num_classes, 2)
    if not labels_fit(info, outputs):
        what = "one logit (a binary classifier: classes 0 and 1)" if outputs == 1 else f"{num_classes} classes"
        raise DataError(f"the data at {info.path} has {info.num_classes} classes but the model outputs {what}")
    if info.kind == "imagefolder" and info.labeled and info.num_classes is not None and \
            info.num_classes < num_classes:
        # Folder k is label k: right when the folders are all of the model's classes in its order, wrong
        # for a subset (e.g. 10 of ImageNet's 1000 class folders), where every label points elsewhere.
        logging.getLogger(__name__).warning(
            "%s has %d class folders but the model outputs %d classes; folder k (sorted) is taken as class k, "
            "which is only right if the folders are the model's first %d classes in its order",
            info.path, info.num_classes, num_classes, info.num_classes,
        )


def default_workers() -> int:
    return 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) - 1)


def limit_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Which of ``n`` items ``--limit`` keeps: a seeded random ``limit`` of them, in file order.

    Not the first ``limit``: an ImageFolder lists its classes in order, so the first 5000 ImageNet
    validation images would be 100 of the 1000 classes. The same ``n``, ``limit`` and seed always give the
    same items (the gate's saved metrics compare like with like)."""
    if limit is None or limit >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values.tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    num_workers: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset``; ``limit`` keeps a seeded random N items (:func:`limit_indices`)."""
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, limit_indices(len(dataset), limit, seed))
    workers = default_workers() if num_workers is None else num_workers
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen,
        drop_last=drop_last, persistent_workers=False,
    )


def bundled_data(split: str) -> Path:
    """Path of a bundled Fashion-MNIST slice: ``"calib"`` (from the train split) or ``"eval"`` (test)."""
    names = {"calib": "fashion_mnist_train_slice.npz", "eval": "fashion_mnist_test_slice.npz"}
    if split not in names:
        raise DataError(f"bundled split must be 'calib' or 'eval', got {split!r}")
    return ASSETS / names[split]
