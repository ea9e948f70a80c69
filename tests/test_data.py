"""Dataset loading (image folders, archives, the embedded set), caching, and augmentation."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tar_folder, write_image_folder

from qarjax import data
from qarjax.errors import DataError


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
