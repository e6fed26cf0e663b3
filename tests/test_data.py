"""Data sources: each kind is recognized, preprocessed identically, and bad sources give clear errors."""

from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from rescompress.data import (
    DEBIAN_FASHION_MNIST,
    check_compatible,
    describe_source,
    limit_indices,
    make_loader,
    open_dataset,
    to_model_input,
)
from rescompress.errors import DataError
from rescompress.spec import get_preset


def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture()
def images():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    return x, y


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_matches_npz(tmp_path, images, gz):
    x, y = images
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    ext = ".gz" if gz else ""
    _write_idx(idx_dir / f"t10k-images-idx3-ubyte{ext}", x, gz)
    _write_idx(idx_dir / f"t10k-labels-idx1-ubyte{ext}", y, gz)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    pre = get_preset("fashion-mnist")
    a = open_dataset(idx_dir, pre)
    b = open_dataset(tmp_path / "d.npz", pre)
    assert a.info.kind == "idx" and a.info.split == "test" and a.info.labeled
    assert b.info.kind == "npz" and len(a) == len(b) == 6
    assert a.info.num_classes == 3
    for i in range(6):
        xa, la = a[i]
        xb, lb = b[i]
        assert la == lb == int(y[i])
        assert xa.shape == (1, 28, 28)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    expected = (x[2].astype(np.float32) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(a[2][0][0].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_image_folder_and_flat_folder(tmp_path, images):
    x, y = images
    tree = tmp_path / "tree"
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = tree / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{i}.png")
        Image.fromarray(img, mode="L").convert("RGB").save(flat / f"{i}.png")
    pre = get_preset("fashion-mnist")
    tree_ds = open_dataset(tree, pre)
    assert tree_ds.info.kind == "imagefolder" and tree_ds.info.classes == ("class_0", "class_1", "class_2")
    labels = sorted(tree_ds[i][1] for i in range(len(tree_ds)))
    assert labels == [0, 0, 1, 1, 2, 2]
    flat_ds = open_dataset(flat, pre)
    assert flat_ds.info.kind == "images" and not flat_ds.info.labeled
    assert flat_ds[0][1] == -1
    # PNG round trip is lossless and RGB->L of a grey image is exact: same tensor as the array source.
    np.savez(tmp_path / "d.npz", x=x)
    arr_ds = open_dataset(tmp_path / "d.npz", pre)
    torch.testing.assert_close(flat_ds[0][0], arr_ds[0][0], rtol=0, atol=1e-6)


def test_image_folder_class_numbers_and_split_roots(tmp_path, images):
    """An empty class folder keeps its number (a validation subset without some class must not shift the
    labels of the classes after it); hidden files and folders are not classes or images; a folder of
    splits (root/train/cat/...) is refused with which folder to pass."""
    x, _ = images
    tree = tmp_path / "tree"
    for name in ("a_cat", "b_empty", "c_dog"):
        (tree / name).mkdir(parents=True)
    Image.fromarray(x[0], mode="L").save(tree / "a_cat" / "0.png")
    Image.fromarray(x[1], mode="L").save(tree / "c_dog" / "1.png")
    Image.fromarray(x[2], mode="L").save(tree / "c_dog" / "2.png")
    (tree / "c_dog" / ".hidden.png").write_bytes(b"not an image")
    (tree / ".ipynb_checkpoints").mkdir()
    Image.fromarray(x[3], mode="L").save(tree / ".ipynb_checkpoints" / "3.png")
    (tree / "notes.txt").write_text("not a class")
    ds = open_dataset(tree, get_preset("fashion-mnist"))
    assert ds.info.classes == ("a_cat", "b_empty", "c_dog") and ds.info.num_classes == 3
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [0, 2, 2]
    same = open_dataset(_npz(tmp_path, x[2:3]), get_preset("fashion-mnist"))[0][0]
    torch.testing.assert_close(ds[2][0], same, rtol=0, atol=1e-6)
    splits = tmp_path / "splits"
    for split in ("train", "val"):
        (splits / split / "cat").mkdir(parents=True)
        Image.fromarray(x[0], mode="L").save(splits / split / "cat" / "0.png")
    with pytest.raises(DataError, match="train, val hold class folders of images: pass one of them"):
        open_dataset(splits, get_preset("fashion-mnist"))


def _npz(tmp_path, x):
    np.savez(tmp_path / "one.npz", x=x)
    return tmp_path / "one.npz"


def _save(path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path)


def test_image_folder_finds_images_in_class_sub_folders(tmp_path, images):
    """Like torchvision's ImageFolder, a class folder's images are found at any depth (same files, same order,
    same labels); hidden files and folders inside it are skipped and an empty class folder keeps its number."""
    from torchvision.datasets import ImageFolder

    x, _ = images
    tree = tmp_path / "tree"
    _save(tree / "cat" / "batch1" / "0.png", x[0])
    _save(tree / "cat" / "batch1" / "deeper" / "1.png", x[1])
    _save(tree / "cat" / "2.png", x[2])
    _save(tree / "dog" / "batch1" / "3.png", x[3])  # the same sub-folder name in two classes
    _save(tree / "dog" / "batch2" / "4.png", x[4])
    ours = describe_source(tree)[1]
    theirs = ImageFolder(str(tree)).samples
    assert [(str(f), label) for f, label in zip(ours.files, ours.labels, strict=True)] == theirs
    _save(tree / "cat" / ".ipynb_checkpoints" / "5.png", x[5])
    (tree / "dog" / "batch2" / ".4.png").write_bytes(b"not an image")
    (tree / "b_empty" / "sub").mkdir(parents=True)
    ds = open_dataset(tree, get_preset("fashion-mnist"))
    assert ds.info.kind == "imagefolder" and ds.info.classes == ("b_empty", "cat", "dog")
    assert [ds[i][1] for i in range(len(ds))] == [1, 1, 1, 2, 2]
    ref = open_dataset(_npz(tmp_path, x[[2, 0, 1, 3, 4]]), get_preset("fashion-mnist"))
    for i in range(5):
        torch.testing.assert_close(ds[i][0], ref[i][0], rtol=0, atol=0)
    single = tmp_path / "single"  # one class whose images are all in a sub-folder
    _save(single / "cat" / "batch1" / "0.png", x[0])
    assert describe_source(single)[0].classes == ("cat",)


def test_split_roots_with_nested_images_are_refused(tmp_path, images, caplog):
    """A folder of usual split names is refused even now that class folders are searched at any depth, and
    DIR@split opens one split; sub-folders repeated across folders and outnumbering them may be splits or
    classes with sub-folders (years, sources): read as classes, like torchvision, with a warning."""
    x, _ = images
    deep = tmp_path / "deep"
    _save(deep / "train" / "cat" / "batch1" / "0.png", x[0])
    _save(deep / "val" / "dog" / "1.png", x[1])
    with pytest.raises(DataError, match="train, val hold class folders of images: pass one of them"):
        open_dataset(deep, get_preset("fashion-mnist"))
    assert describe_source(f"{deep}@val")[0].classes == ("dog",)
    with pytest.raises(DataError, match="no IDX split or split folder 'test'"):
        describe_source(f"{deep}@test")
    folds = tmp_path / "folds"
    for fold in ("fold1", "fold2"):
        for name in ("bird", "cat", "dog"):
            _save(folds / fold / name / "0.png", x[0])
    with caplog.at_level("WARNING"):
        assert describe_source(folds)[0].classes == ("fold1", "fold2")
    assert "if they are dataset splits, pass one of them" in caplog.text
    odd = tmp_path / "odd"  # one split name off the list: still splits when the class folders repeat
    for split in ("train", "val", "test_set"):
        for name in ("cats", "dogs"):
            _save(odd / split / name / "0.png", x[0])
    with pytest.raises(DataError, match="looks like a folder of dataset splits"):
        describe_source(odd)
    vehicles = tmp_path / "vehicles"  # a class named like a split, its images one folder down
    for name in ("bus", "car", "train"):
        _save(vehicles / name / "flickr" / "0.png", x[0])
    assert describe_source(vehicles)[0].classes == ("bus", "car", "train")

    batches = tmp_path / "batches"  # classes with repeated batch folders: as many classes as batches
    for name in ("cat", "dog"):
        for batch in ("batch1", "batch2"):
            _save(batches / name / batch / "0.png", x[0])
    assert describe_source(batches)[0].classes == ("cat", "dog")
    mixed = tmp_path / "mixed"  # images directly in one folder: a tree of classes, whatever the names
    _save(mixed / "train" / "0.png", x[0])
    _save(mixed / "val" / "cat" / "0.png", x[0])
    assert describe_source(mixed)[0].classes == ("train", "val")

def test_images_beside_class_folders_and_split_of_a_file_are_refused(tmp_path, images):
    """200 images at the top and 8 in one sub-folder read as one class of 8: the 200 were silently dropped."""
    x, _ = images
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"{i}.png", x[i])
    _save(flat / "rejected" / "5.png", x[5])
    with pytest.raises(DataError, match="holds 3 images directly and more in the sub-folders rejected"):
        describe_source(flat)
    with pytest.raises(DataError, match="picks a split of a folder"):
        describe_source(f"{_npz(tmp_path, x[:2])}@train")


def test_imagenet_preset_resizes_and_replicates_channels(images):
    x, _ = images
    pre = get_preset("imagenet")
    out = to_model_input(torch.from_numpy(x[0]), pre)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[0] * 0.229 + 0.485, out[1] * 0.224 + 0.456, rtol=0, atol=1e-5)
    pre64 = get_preset("fashion-mnist").with_overrides(size=64, channels=3)
    assert pre64.mean_per_channel == (0.2860,) * 3
    assert to_model_input(torch.from_numpy(x[0]), pre64).shape == (3, 64, 64)


def test_npz_layouts_and_float_input(tmp_path, images):
    x, _ = images
    nhwc = np.repeat(x[..., None], 3, axis=-1)
    np.savez(tmp_path / "nhwc.npz", x=nhwc)
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32) / 255.0)
    pre = get_preset("cifar")
    a = open_dataset(tmp_path / "nhwc.npz", pre)
    assert a[0][0].shape == (3, 32, 32)
    b = open_dataset(tmp_path / "float.npz", get_preset("fashion-mnist"))
    c = open_dataset(tmp_path / "nhwc.npz", get_preset("fashion-mnist"))
    torch.testing.assert_close(b[3][0], c[3][0], rtol=0, atol=1e-5)


def test_npz_wide_integers_are_scaled_and_normalized_floats_refused(tmp_path, eval_npz):
    """16-bit (and wider) integers are scaled like 16-bit image files, not clipped at 255; floats in [0, 1]
    or [0, 255] are pixels; negative floats (already normalized data) are refused rather than mangled."""
    with np.load(eval_npz) as z:
        x, y = z["x"][:64], z["y"][:64]
    pre = get_preset("fashion-mnist")

    def tensors(name: str, arr: np.ndarray) -> torch.Tensor:
        np.savez(tmp_path / f"{name}.npz", x=arr, y=y)
        ds = open_dataset(tmp_path / f"{name}.npz", pre)
        assert [ds[i][1] for i in range(len(ds))] == y.tolist()
        return torch.stack([ds[i][0] for i in range(len(ds))])

    ref = tensors("uint8", x)
    assert int(x.max()) == 255  # the scaled copies below reach 65535 and 2**32 - 1
    torch.testing.assert_close(tensors("uint16", x.astype(np.uint16) * 257), ref, rtol=0, atol=0)
    torch.testing.assert_close(tensors("int64", x.astype(np.int64) * 257), ref, rtol=0, atol=0)
    torch.testing.assert_close(tensors("uint32", x.astype(np.uint32) * 0x01010101), ref, rtol=0, atol=0)
    torch.testing.assert_close(tensors("int32_narrow", x.astype(np.int32)), ref, rtol=0, atol=0)
    torch.testing.assert_close(tensors("unit", x.astype(np.float32) / 255.0), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tensors("float255", x.astype(np.float64)), ref, rtol=0, atol=1e-6)
    np.savez(tmp_path / "normalized.npz", x=(x.astype(np.float32) / 255.0 - 0.2860) / 0.3530, y=y)
    with pytest.raises(DataError, match=r"looks already normalized; save raw pixels \(uint8 0-255 or float 0-1\)"):
        describe_source(tmp_path / "normalized.npz")


def _make_bad(kind: str, p):
    if kind == "missing":
        return p / "missing"
    if kind == "empty":
        (p / "empty").mkdir()
        return p / "empty"
    if kind == "text":
        (p / "a.txt").write_text("hi")
        return p / "a.txt"
    arrays = {
        "no_x": {"y": np.zeros(3)},
        "mismatch": {"x": np.zeros((3, 8, 8)), "y": np.zeros(2)},
        "nan": {"x": np.full((2, 8, 8), np.nan)},
        "ndim": {"x": np.zeros((8, 8))},
        "float_range": {"x": np.full((2, 8, 8), 300.0)},
        "negative_int": {"x": np.full((2, 8, 8), -3, dtype=np.int16)},
    }[kind]
    np.savez(p / f"{kind}.npz", **arrays)
    return p / f"{kind}.npz"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty", "holds no images"),
        ("text", "unsupported kind"),
        ("no_x", "needs an array 'x'"),
        ("mismatch", "3 images in 'x' but 2 labels"),
        ("nan", "NaN"),
        ("ndim", "3 or 4 dimensions"),
        ("float_range", r"floats up to 300; expected pixels in \[0, 1\] or \[0, 255\]"),
        ("negative_int", "negative values"),
    ],
)
def test_bad_sources_raise_data_error(tmp_path, kind, message):
    with pytest.raises(DataError, match=message):
        describe_source(_make_bad(kind, tmp_path))


def test_unreadable_image_is_a_data_error(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not a png")
    ds = open_dataset(d, get_preset("cifar"))
    with pytest.raises(DataError, match="cannot read image"):
        ds[0]


def test_class_count_and_label_checks(calib_npz):
    info, _ = describe_source(calib_npz)
    assert info.labeled and info.num_classes == 10 and info.length == 2048
    check_compatible(info, num_classes=10, require_labels=True)
    with pytest.raises(DataError, match="10 classes but the model outputs 5"):
        check_compatible(info, num_classes=5)


def test_fewer_class_folders_than_outputs_is_warned(tmp_path, images, caplog):
    x, _ = images
    for name in ("n01440764", "n01443537"):  # two of ImageNet's folders: labels 0 and 1 here
        (tmp_path / name).mkdir()
        Image.fromarray(x[0], mode="L").save(tmp_path / name / "0.png")
    info, _ = describe_source(tmp_path)
    with caplog.at_level("WARNING", logger="rescompress.data"):
        check_compatible(info, num_classes=2)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="rescompress.data"):
        check_compatible(info, num_classes=1000)
    assert "has 2 class folders but the model outputs 1000 classes" in caplog.text


def test_unlabeled_data_refused_where_labels_needed(tmp_path, images):
    np.savez(tmp_path / "u.npz", x=images[0])
    info, _ = describe_source(tmp_path / "u.npz")
    check_compatible(info, num_classes=10)  # fine for calibration
    with pytest.raises(DataError, match="needs labeled data"):
        check_compatible(info, num_classes=10, require_labels=True, purpose="evaluation")


def test_loader_limits_and_seeded_sampling(eval_npz):
    ds = open_dataset(eval_npz, get_preset("fashion-mnist"))
    first = make_loader(ds, batch_size=16, limit=40)
    assert sum(len(b[1]) for b in first) == 40
    r1 = torch.cat([b[1] for b in make_loader(ds, batch_size=64, limit=100, seed=3)])
    r2 = torch.cat([b[1] for b in make_loader(ds, batch_size=64, limit=100, seed=3)])
    r3 = torch.cat([b[1] for b in make_loader(ds, batch_size=64, limit=100, seed=4)])
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_limit_samples_across_a_class_sorted_folder(tmp_path):
    """--limit on an ImageFolder (classes listed in order) must not keep only the first classes."""
    from PIL import Image

    for c in range(10):
        (tmp_path / f"c{c}").mkdir()
        for i in range(20):
            Image.fromarray(np.full((8, 8), c * 20 + i, np.uint8)).save(tmp_path / f"c{c}" / f"{i:02d}.png")
    ds = open_dataset(tmp_path, get_preset("fashion-mnist"))
    labels = torch.cat([b[1] for b in make_loader(ds, batch_size=64, limit=40)])
    assert len(labels) == 40 and len(set(labels.tolist())) >= 8  # the first 40 files are classes 0 and 1 only
    assert limit_indices(200, 40) == limit_indices(200, 40) == sorted(limit_indices(200, 40))
    assert limit_indices(5, 40) == [0, 1, 2, 3, 4] and limit_indices(5, None) == [0, 1, 2, 3, 4]


def test_bundled_slices_are_disjoint_from_each_other():
    from rescompress.data import bundled_data

    calib = np.load(bundled_data("calib"))["x"].reshape(2048, -1)
    evals = np.load(bundled_data("eval"))["x"].reshape(2000, -1)
    calib_set = {row.tobytes() for row in calib}
    assert not any(row.tobytes() in calib_set for row in evals)


@pytest.mark.needs_full_fashion_mnist
def test_debian_fashion_mnist_splits():
    pre = get_preset("fashion-mnist")
    test = open_dataset(DEBIAN_FASHION_MNIST, pre, split="test")
    train = open_dataset(f"{DEBIAN_FASHION_MNIST}@train", pre)
    assert (len(test), len(train)) == (10000, 60000)
    assert test.info.num_classes == train.info.num_classes == 10


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path, images):
    """PIL's own conversion clips 16-bit grey at 255 (a white image); the reader scales it to 8 bits."""
    x, _ = images
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    wide.mkdir()
    narrow.mkdir()
    Image.fromarray(x[0].astype(np.uint16) * 257).save(wide / "0.png")  # 16-bit PNG: mode I;16
    Image.fromarray(x[0], mode="L").save(narrow / "0.png")
    with Image.open(wide / "0.png") as im:
        assert im.mode.startswith("I")
    pre = get_preset("fashion-mnist")
    torch.testing.assert_close(open_dataset(wide, pre)[0][0], open_dataset(narrow, pre)[0][0], rtol=0, atol=0)


def test_npz_one_hot_labels_and_idx_split_names(tmp_path, eval_npz):
    z = np.load(eval_npz)
    x, y = z["x"][:50], z["y"][:50]
    np.savez(tmp_path / "hot.npz", x=x, y=np.eye(10, dtype=np.float32)[y])
    pre = get_preset("fashion-mnist")
    hot = open_dataset(tmp_path / "hot.npz", pre)
    assert [hot[i][1] for i in range(50)] == y.tolist()
    np.savez(tmp_path / "soft.npz", x=x, y=np.full((50, 10), 0.1, np.float32))
    with pytest.raises(DataError, match="neither class indices"):
        open_dataset(tmp_path / "soft.npz", pre)
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        return
    with pytest.raises(DataError, match="has no IDX split 'val'; it has train, test"):
        describe_source(f"{DEBIAN_FASHION_MNIST}@val")


def test_npz_messages_name_the_real_problem(tmp_path, images):
    x, y = images
    cases = [
        ({"x": np.stack([x, np.full_like(x, 255)], -1), "y": y}, "holds 2-channel images"),
        ({"x": x, "labels": y}, "the labels must be the array 'y'; found 'labels'"),
        ({"x": x, "y": np.where(np.arange(len(y)) == 0, -3, y.astype(np.int64))}, "negative class indices (min -3)"),
    ]
    for i, (arrays, message) in enumerate(cases):
        np.savez(tmp_path / f"{i}.npz", **arrays)
        with pytest.raises(DataError, match=re.escape(message)):
            describe_source(tmp_path / f"{i}.npz")
    np.savez(tmp_path / "bool.npz", x=x > 127, y=y)  # 1-bit images: white is 255, like PIL's mode "1"
    reader = describe_source(tmp_path / "bool.npz")[1]
    assert np.array_equal(reader(0)[0].numpy(), np.where(x[0] > 127, 255, 0).astype(np.uint8))


def test_binary_model_mismatch_message_says_one_logit(tmp_path, images):
    from rescompress.data import check_compatible

    x, _ = images
    np.savez(tmp_path / "three.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match=re.escape("has 3 classes but the model outputs one logit (a binary")):
        check_compatible(describe_source(tmp_path / "three.npz")[0], 1)


def test_user_data_pitfalls(tmp_path, images, caplog):
    """Found probing users' data: a float [0, 1] set with one pixel at 1.02 went black; uint16 pixels under 256
    were read as 8-bit (a 16-bit PNG of the same values is not); a symlink back to the root counted other
    classes' images under one label; {bus,car,train}/{day,night} was refused as splits; numeric class folders
    were silently numbered 0, 1, 10, 11, 2, ...; a 1x8000 banner took 1.6 GB to resize."""
    import logging
    import os

    x, y = images
    pre = get_preset("fashion-mnist")
    f = x.astype(np.float32) / 255.0
    f[0, 0, 0] = 1.02  # resize overshoot
    np.savez(tmp_path / "f.npz", x=f)
    np.savez(tmp_path / "u8.npz", x=x)
    over, ref = open_dataset(tmp_path / "f.npz", pre), open_dataset(tmp_path / "u8.npz", pre)
    torch.testing.assert_close(over[1][0], ref[1][0], rtol=0, atol=1e-5)
    np.savez(tmp_path / "u16.npz", x=np.full((2, 28, 28), 200, np.uint16))
    Image.fromarray(np.full((28, 28), 200, np.uint16)).save(tmp_path / "u16.png")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.full((28, 28), 200, np.uint16)).save(flat / "a.png")
    torch.testing.assert_close(open_dataset(tmp_path / "u16.npz", pre)[0][0], open_dataset(flat, pre)[0][0])

    tree = tmp_path / "tree"
    for c in ("a", "b"):
        (tree / c).mkdir(parents=True)
        Image.fromarray(x[0]).save(tree / c / "x.png")
    os.symlink("..", tree / "a" / "up")
    os.symlink(".", tree / "zloop")
    info, _ = describe_source(tree, "test")
    assert info.length == 2 and info.classes == ("a", "b")

    rides = tmp_path / "rides"
    for c in ("bus", "car", "train"):
        for t in ("day", "night"):
            (rides / c / t).mkdir(parents=True)
            Image.fromarray(x[0]).save(rides / c / t / "x.png")
    info, _ = describe_source(rides, "test")
    assert info.classes == ("bus", "car", "train") and info.length == 6

    numbered = tmp_path / "numbered"
    for c in range(12):
        (numbered / str(c)).mkdir(parents=True)
        Image.fromarray(x[0]).save(numbered / str(c) / "x.png")
    with caplog.at_level(logging.WARNING):
        info, _ = describe_source(numbered, "test")
    assert info.classes[2] == "10" and "folder 10 is class 2" in caplog.text

    banner = torch.randint(0, 256, (3, 1, 8000), dtype=torch.uint8)
    out = to_model_input(banner, get_preset("imagenet"))
    assert out.shape == (3, 224, 224)
    from rescompress.data import _trim_long_side

    assert _trim_long_side(banner, get_preset("imagenet")).shape[-1] < 16  # 1 px tall: ~1 px of 8000 kept
