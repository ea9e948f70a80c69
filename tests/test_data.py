"""Dataset loading (image folders, archives, the embedded set), caching, and augmentation."""

import dataclasses
import os
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_dataset
from helpers import tar_folder, write_image_folder
from PIL import Image

from qarjax import data
from qarjax.config import default_augment_config
from qarjax.errors import ConfigError, DataError
from qarjax.loop import fit


def test_image_folder_and_its_archive_load_the_same(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    archive = tar_folder(folder, tmp_path / "imgs.tar.gz", top="cifar_like")
    a = data.load_dataset(f"imagefolder:{folder}")
    b = data.load_dataset(f"imagefolder:{archive}")
    assert a.train_images.shape == (36, 16, 16, 3) and a.train_images.dtype == np.uint8
    assert a.test_images.shape == (12, 16, 16, 3)
    assert a.class_names == b.class_names == ("class0", "class1", "class2")
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.train_labels, np.repeat(np.arange(3), 12))


def test_second_load_comes_from_the_cache(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=(40, 10))
    archive = tar_folder(folder, tmp_path / "imgs.tar.gz")
    first = data.load_dataset(f"imagefolder:{archive}", cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    began = time.perf_counter()
    second = data.load_dataset(f"imagefolder:{archive}", cache_dir=str(tmp_path / "cache"))
    assert time.perf_counter() - began < 1.0
    np.testing.assert_array_equal(first.train_images, second.train_images)


def test_embedded_mini_cifar10_is_balanced_real_data():
    d = data.load_dataset("cifar10_mini")
    assert d.train_images.shape == (5000, 32, 32, 3)
    assert d.test_images.shape == (1000, 32, 32, 3)
    assert d.num_classes == 10 and d.class_names[0] == "airplane"
    np.testing.assert_array_equal(np.bincount(d.train_labels), np.full(10, 500))
    np.testing.assert_array_equal(np.bincount(d.test_labels), np.full(10, 100))
    assert 100 < d.train_images.mean() < 140  # natural images, not noise or blanks


@pytest.mark.parametrize(
    "name, message",
    [
        ("imagefolder:/no/such/path", "does not exist"),
        ("mnist_from_mars", "unknown dataset"),
    ],
)
def test_bad_dataset_names(name, message):
    with pytest.raises(DataError, match=message):
        data.load_dataset(name)


def test_empty_class_folder_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    (folder / "train" / "class9").mkdir()
    with pytest.raises(DataError, match="class folder has no images: .*class9"):
        data.load_dataset(f"imagefolder:{folder}")


def test_corrupt_image_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    (folder / "train" / "class1" / "005.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot decode image .*class1/005\.png"):
        data.load_dataset(f"imagefolder:{folder}")


def test_truncated_archive_is_an_error(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    archive = tar_folder(folder, tmp_path / "imgs.tar.gz")
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read archive"):
        data.load_dataset(f"imagefolder:{archive}")


def test_a_one_class_folder_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", classes=1)
    with pytest.raises(DataError, match=r"one class under train/ \(class0\): .*two or more"):
        data.load_dataset(f"imagefolder:{folder}")


def test_a_decompression_bomb_is_refused_by_name(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")  # 400 M pixels in a few hundred KB
    Image.new("1", (20000, 20000)).save(folder / "train" / "class2" / "bomb.png")
    with pytest.raises(DataError, match=r"image train/class2/bomb.png is refused as too large"):
        data.load_dataset(f"imagefolder:{folder}")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")  # opening it for reading would wait for a writer forever
    with pytest.raises(DataError, match="is neither a folder nor an archive file"):
        data.load_dataset(f"imagefolder:{tmp_path / 'fifo'}")


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=(2, 1))
    wide = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    for f in folder.rglob("*.png"):
        Image.fromarray(wide).save(f)  # mode I;16, which PIL's convert("L") clips at 255
    d = data.load_dataset(f"imagefolder:{folder}", cache_dir=str(tmp_path / "cache"))
    assert d.image_shape == (16, 16, 1)
    want = np.round(wide.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(d.train_images[0, ..., 0], want)


@pytest.mark.parametrize("how", ["labels beyond the classes", "float images", "not a zip",
                                 "a folder"])  # fmt: skip
def test_a_broken_or_crafted_cache_is_rebuilt_never_trusted(tmp_path, how):
    folder = write_image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = data.load_dataset(f"imagefolder:{folder}", cache_dir=str(cache))
    (file,) = cache.glob("*.npz")
    arrays = dict(np.load(file))
    file.unlink()
    if how == "labels beyond the classes":
        arrays["train_labels"] = arrays["train_labels"] + 99
    elif how == "float images":
        arrays["test_images"] = arrays["test_images"].astype(np.float32)
    if how == "not a zip":
        file.write_bytes(b"PK\x03\x04 nothing more")
    elif how == "a folder":
        file.mkdir()
    else:
        with open(file, "wb") as f:
            np.savez(f, **arrays)
    again = data.load_dataset(f"imagefolder:{folder}", cache_dir=str(cache))
    np.testing.assert_array_equal(again.train_labels, first.train_labels)
    np.testing.assert_array_equal(again.test_images, first.test_images)
    if how != "a folder":  # rewritten from the images
        np.testing.assert_array_equal(np.load(file)["train_labels"], first.train_labels)


def test_tfds_without_tensorflow_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tfds(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tfds)
    with pytest.raises(DataError, match=r"qarjax\[tfds\]"):
        data.load_dataset("cifar10")


def test_augment_crops_and_flips_per_image():
    images = jnp.arange(4 * 8 * 8 * 3, dtype=jnp.uint8).reshape(4, 8, 8, 3)
    out = jax.jit(lambda x, k: data.augment(x, k, pad=2))(images, jax.random.key(0))
    assert out.shape == images.shape and out.dtype == jnp.uint8
    again = data.augment(images, jax.random.key(0), pad=2)
    np.testing.assert_array_equal(out, again)  # a key fixes the augmentation
    plain = data.augment(images, jax.random.key(0), pad=0, flip=False)
    np.testing.assert_array_equal(plain, images)
    flipped_or_not = data.augment(images, jax.random.key(3), pad=0, flip=True)
    for got, img in zip(flipped_or_not, images, strict=True):
        assert np.array_equal(got, img) or np.array_equal(got, img[:, ::-1])


def test_normalize_standardizes():
    x = jnp.full((2, 4, 4, 3), 128, jnp.uint8)
    out = data.normalize(x, jnp.array([128.0, 100.0, 0.0]), jnp.array([1.0, 2.0, 128.0]))
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 14.0, 1.0])


def test_augment_without_flip_only_crops():
    """flip=False: every output is a crop of its zero-padded source, never a mirrored one
    (the sources are asymmetric, so a mirror would show)."""
    images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (16, 8, 8, 1)), jnp.uint8)
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))

    def crops(src):
        return [src[y : y + 8, x : x + 8] for y in range(5) for x in range(5)]

    moved = 0
    for seed in range(4):
        out = np.asarray(data.augment(images, jax.random.key(seed), pad=2, flip=False))
        for got, src in zip(out, padded, strict=True):
            assert any(np.array_equal(got, c) for c in crops(src))
            assert not any(np.array_equal(got, c) for c in crops(src[:, ::-1]))
            moved += not np.array_equal(got, src[2:10, 2:10])
    assert moved > 32  # the crops do move


def _dataset(name, size=16):
    return dataclasses.replace(make_dataset(n_train=8, n_test=4, size=size), name=name)


@pytest.mark.parametrize(
    "name, crop, flip, expected",
    [
        ("cifar10_mini", None, None, (2, True)),  # an eighth of the side: 4 on 32x32
        ("cifar10", None, None, (2, True)),
        ("imagefolder:/x", None, None, (2, False)),  # a folder is not flipped unless asked
        ("tfds:mnist", None, None, (2, False)),
        ("imagefolder:/x", None, True, (2, True)),  # an explicit key beats the default
        ("cifar10_mini", 0, False, (0, False)),
        ("cifar10_mini", 5, None, (5, True)),
    ],
)
def test_augmentation_defaults_per_dataset_and_explicit_keys_win(name, crop, flip, expected):
    cfg = default_augment_config()
    cfg.crop_padding, cfg.flip = crop, flip
    got = data.resolve_augmentation(cfg, _dataset(name))
    assert (got.crop_padding, got.flip) == expected
    origin = [f"{name}'s default" if v is None else "the config" for v in (crop, flip)]
    assert got.origin == tuple(origin)


def test_cifar_size_default_is_four_pixels():
    got = data.resolve_augmentation(default_augment_config(), _dataset("cifar10_mini", 32))
    assert (got.crop_padding, got.flip) == (4, True)


@pytest.mark.parametrize(
    "crop, flip, message",
    [
        (-1, True, r"augment.crop_padding must be an integer >= 0 \(0: no crop\), got -1"),
        (16, True, r"augment.crop_padding=16 must be smaller than the 16x16 images' side"),
        (2.5, True, r"augment.crop_padding must be an integer >= 0"),
        (2, 1, r"augment.flip must be True or False, got 1"),
        (2, "yes", r"augment.flip must be True or False, got 'yes'"),
    ],
)
def test_bad_augmentation_values_are_refused(crop, flip, message):
    with pytest.raises(ConfigError, match=message):
        data.resolve_augmentation(SimpleNamespace(crop_padding=crop, flip=flip), _dataset("x"))


def test_locked_augment_config_refuses_wrong_types():
    cfg = default_augment_config()
    with pytest.raises(TypeError):
        cfg.flip = 1
    with pytest.raises(TypeError):
        cfg.crop_padding = "4"


def test_rgb_to_gray_is_pils_luminance():
    rgb = np.random.default_rng(1).integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])[..., None]
    np.testing.assert_array_equal(data.to_channels(rgb, 1), want)
    np.testing.assert_array_equal(data.to_channels(want, 3), np.repeat(want, 3, axis=-1))


def _gray_folder(root, rgb_too=False):
    folder = write_image_folder(root, per_class=(8, 2), classes=2)
    for path in sorted(folder.rglob("*.png")):
        Image.open(path).convert("L").save(path)
    if rgb_too:  # one colour image makes the whole set RGB
        Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "test" / "class0" / "999.png")
    return folder


def test_grayscale_folder_keeps_one_channel_unless_asked(tmp_path):
    gray = _gray_folder(tmp_path / "gray")
    d = data.load_dataset(f"imagefolder:{gray}")
    assert d.image_shape == (16, 16, 1) and d.channel_mean.shape == (1,)
    as_rgb = data.load_dataset(f"imagefolder:{gray}", channels=3)
    np.testing.assert_array_equal(as_rgb.train_images, np.repeat(d.train_images, 3, axis=-1))
    mixed = data.load_dataset(f"imagefolder:{_gray_folder(tmp_path / 'mixed', True)}")
    assert mixed.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(mixed.train_images[..., :1], d.train_images)
    assert data.load_dataset("cifar10_mini", channels=1).image_shape == (32, 32, 1)
    with pytest.raises(ConfigError, match=r"dataset_channels must be one of \(0, 1, 3\), got 2"):
        data.load_dataset(f"imagefolder:{gray}", channels=2)


def test_grayscale_folder_trains_with_one_channel_and_logs_its_augmentation(
    tiny_config, tmp_path, capsys
):
    tiny_config.dataset = f"imagefolder:{_gray_folder(tmp_path / 'gray')}"
    tiny_config.num_epochs, tiny_config.batch_size, tiny_config.eval_batch_size = 1, 8, 8
    tiny_config.augment.flip = True
    result = fit(tiny_config, tmp_path / "run")
    assert result.state.params["conv1"]["conv"]["kernel"].shape[2] == 1  # in-channels: the data's
    assert result.trainer.augmentation == data.Augmentation(
        2, True, (f"{tiny_config.dataset}'s default", "the config")
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        f"augmentation: random crop after 2-pixel padding ({tiny_config.dataset}'s default), "
        "random horizontal flip (the config)"
    )


def test_holdout_is_a_fixed_disjoint_draw_and_both_splits_train_alike():
    from qarjax.data import with_holdout

    d = make_dataset(n_train=100, n_test=20)
    d = dataclasses.replace(d, train_labels=np.arange(100, dtype=np.int32))  # ids as labels
    final, search = with_holdout(d, 10, "test"), with_holdout(d, 10, "holdout")
    assert np.array_equal(final.train_labels, search.train_labels)  # one plain run serves both
    assert np.array_equal(final.train_images, search.train_images)
    assert np.array_equal(final.test_labels, d.test_labels)  # the test set stays untouched
    held = set(search.test_labels.tolist())
    assert len(held) == 10 and not held & set(search.train_labels.tolist())
    assert np.array_equal(with_holdout(d, 10, "holdout").test_labels, search.test_labels)
    assert with_holdout(d, 0) is d


@pytest.mark.parametrize(
    "n, split, message",
    [(-1, "test", "whole number >= 0"), (2.5, "test", "whole number"), (100, "test", "leaves none"),
     (0, "holdout", "needs holdout > 0"), (5, "val", "eval_split must be one of")],
)  # fmt: skip
def test_bad_holdouts_are_refused(n, split, message):
    from qarjax.data import with_holdout

    with pytest.raises(ConfigError, match=message):
        with_holdout(make_dataset(n_train=100), n, split)


def test_an_archive_member_larger_than_an_image_is_refused_unread(tmp_path):
    """A member of zeros compresses to almost nothing (one of 3 GiB once took 3.3 GB of
    memory before its refusal): its size is read from the tar header and refused unread."""
    import io
    import tarfile

    folder = write_image_folder(tmp_path / "imgs", per_class=(2, 1))
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for f in sorted(folder.rglob("*.png")):
            tar.add(f, arcname=str(f.relative_to(folder)))
        info = tarfile.TarInfo("train/class0/huge.png")
        info.size = data.MAX_IMAGE_FILE_BYTES + 1
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(DataError, match=r"image train/class0/huge.png is 67,108,865 bytes: "
                       r"refused unread, an image file may be at most 64 MiB"):  # fmt: skip
        data.load_dataset(f"imagefolder:{archive}")


@pytest.mark.parametrize("compressed", [False, True])
def test_an_archive_damaged_after_its_first_member_is_refused_not_cut_short(tmp_path, compressed):
    """tarfile reads a damaged header after the first as the archive's end: without a check
    the images before it would load as the whole dataset."""
    import gzip
    import tarfile

    folder = write_image_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    blob = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        third = tar.getmembers()[2].offset  # a file's header, beyond the first member
    blob[third + 148 : third + 156] = b"0000000\0"  # its header checksum, now wrong
    if compressed:
        archive = tmp_path / "imgs.tar.gz"
        blob = gzip.compress(bytes(blob))
    archive.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="listing ends at a damaged header"):
        data.load_dataset(f"imagefolder:{archive}", cache_dir=str(tmp_path / "cache"))


def test_a_compressed_archive_with_flipped_bytes_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    archive = tar_folder(folder, tmp_path / "imgs.tar.gz")
    blob = bytearray(archive.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 200):
        blob[i] ^= 0x5A
    archive.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot read archive"):
        data.load_dataset(f"imagefolder:{archive}", cache_dir=str(tmp_path / "cache"))


def test_a_rewritten_image_of_the_same_size_is_not_served_from_the_cache(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=(4, 2))
    cache = str(tmp_path / "cache")
    first = data.load_dataset(f"imagefolder:{folder}", cache_dir=cache)
    image = sorted((folder / "train").rglob("*.png"))[0]
    pixels = np.asarray(Image.open(image))
    Image.fromarray(255 - pixels).save(image)  # a PNG of other pixels (its size may match)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    second = data.load_dataset(f"imagefolder:{folder}", cache_dir=cache)
    assert not np.array_equal(first.train_images, second.train_images)


def test_an_unreadable_image_is_one_error_naming_it(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "imgs", per_class=(4, 2))
    image = sorted((folder / "train").rglob("*.png"))[0]
    read = Path.read_bytes

    def denied(self):  # a permission the test's user (root, say) cannot be denied for real
        if self == image:
            raise PermissionError(13, "Permission denied", str(self))
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match=f"cannot read image {image}: Permission denied"):
        data.load_dataset(f"imagefolder:{folder}", cache_dir=str(tmp_path / "cache"))
