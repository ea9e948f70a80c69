"""Datasets as uint8 arrays: loading, caching, and on-device augmentation.

A dataset is loaded once into host memory as uint8 NHWC arrays (`Dataset`), then placed on the
accelerator whole; batches are gathered, augmented (random crop with padding, horizontal flip)
and normalized inside the jitted step, so an epoch needs no host round trips.

Dataset names:
  - ``cifar10_mini``: the embedded default, a class-balanced subset of real CIFAR-10
    (5,000 train / 1,000 test JPEGs shipped in the package; built by
    ``experiments/make_cifar10_mini.py`` from the shared archive).
  - ``imagefolder:<path>``: a folder, ``.tar``, ``.tar.gz`` or ``.tgz`` holding
    ``train/<class>/*`` and ``test/<class>/*`` images (an optional top folder is allowed).
    Decoded arrays are cached (``$QARJAX_CACHE``, default ``~/.cache/qarjax``), so the second
    load of the 60,000-image CIFAR-10 archive takes well under a second.
  - ``cifar10`` (or ``tfds:<name>``): TensorFlow Datasets; needs the ``tfds`` extra and, the
    first time, the internet. ``data_dir`` is passed to ``tfds.load``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qarjax.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm")
MINI_ARCHIVE = Path(__file__).parent / "assets" / "cifar10_mini.tar.gz"
_CACHE_VERSION = "v1"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset held as host arrays.

    Attributes:
      name: the name it was loaded by.
      train_images, test_images: uint8 arrays of shape (N, H, W, C).
      train_labels, test_labels: int32 arrays of shape (N,).
      class_names: the class of each label index.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def channel_mean(self) -> np.ndarray:
        return self.train_images.reshape(-1, self.image_shape[-1]).mean(0).astype(np.float32)

    @property
    def channel_std(self) -> np.ndarray:
        return self.train_images.reshape(-1, self.image_shape[-1]).std(0).astype(np.float32)


def load_dataset(
    name: str, *, data_dir: str | None = None, cache_dir: str | None = None
) -> Dataset:
    """Loads a dataset by name (see the module docstring for the names)."""
    if name == "cifar10_mini":
        return dataclasses.replace(_load_image_folder(MINI_ARCHIVE, cache_dir), name=name)
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        return dataclasses.replace(_load_image_folder(path, cache_dir), name=name)
    if name == "cifar10" or name.startswith("tfds:"):
        return _load_tfds(name.removeprefix("tfds:"), data_dir)
    raise DataError(
        f"unknown dataset {name!r}: use cifar10_mini, imagefolder:<path>, cifar10 or tfds:<name>"
    )


# ----------------------------------------------------------------------------- image folders


def _load_image_folder(path: Path, cache_dir: str | None) -> Dataset:
    if not path.exists():
        raise DataError(f"dataset path does not exist: {path}")
    cache_file = _cache_path(path, cache_dir)
    if cache_file is not None and cache_file.exists():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                return Dataset(
                    name=str(path),
                    train_images=z["train_images"],
                    train_labels=z["train_labels"],
                    test_images=z["test_images"],
                    test_labels=z["test_labels"],
                    class_names=tuple(str(c) for c in z["class_names"]),
                )
        except Exception:  # A broken cache is rebuilt, never trusted.
            cache_file.unlink(missing_ok=True)
    files = dict(_list_images(path))
    dataset = _decode_splits(path, files)
    if cache_file is not None:
        _write_cache(cache_file, dataset)
    return dataset


def _list_images(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yields (relative name, file bytes) for every image file under a folder or archive."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                yield file.relative_to(path).as_posix(), file.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield member.name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from None


def _split_name(name: str) -> tuple[str, str] | None:
    """Maps '[top/]train/<class>/<file>' to ('train', class); None for other files."""
    parts = Path(name).parts
    for i, part in enumerate(parts[:-2]):
        if part in ("train", "test") and len(parts) - i == 3:
            return part, parts[i + 1]
    return None


def _decode_splits(path: Path, files: dict[str, bytes]) -> Dataset:
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in sorted(files):
        where = _split_name(name)
        if where is not None:
            by_split[where[0]].setdefault(where[1], []).append(name)
    for split in ("train", "test"):
        if not by_split[split]:
            raise DataError(f"{path} has no images under {split}/<class>/")
    _check_no_empty_class_dirs(path)
    class_names = tuple(sorted(by_split["train"]))
    unknown = sorted(set(by_split["test"]) - set(class_names))
    if unknown:
        raise DataError(f"{path}: test classes {unknown} have no train images")
    arrays = {}
    for split in ("train", "test"):
        names = [n for c in class_names for n in by_split[split].get(c, [])]
        labels = [i for i, c in enumerate(class_names) for _ in by_split[split].get(c, [])]
        arrays[split] = (_decode_all(names, files), np.asarray(labels, np.int32))
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise DataError(f"{path}: train and test images differ in size")
    return Dataset(str(path), *arrays["train"], *arrays["test"], class_names)


def _check_no_empty_class_dirs(path: Path) -> None:
    if not path.is_dir():
        return  # Archives do not list empty folders reliably; missing classes show as no images.
    for split in ("train", "test"):
        root = next((p for p in path.rglob(split) if p.is_dir()), None)
        for class_dir in sorted(root.iterdir()) if root else []:
            if class_dir.is_dir() and not any(
                f.suffix.lower() in IMAGE_SUFFIXES for f in class_dir.iterdir()
            ):
                raise DataError(f"class folder has no images: {class_dir}")


def _decode_one(name: str, data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


def _decode_all(names: list[str], files: dict[str, bytes]) -> np.ndarray:
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(lambda n: _decode_one(n, files[n]), names, chunksize=256))
    shape = images[0].shape
    for name, image in zip(names, images, strict=True):
        if image.shape != shape:
            raise DataError(f"image {name} has shape {image.shape}, expected {shape}")
    return np.stack(images)


def _cache_path(path: Path, cache_dir: str | None) -> Path | None:
    root = Path(cache_dir or os.environ.get("QARJAX_CACHE", "~/.cache/qarjax")).expanduser()
    stat = path.stat()
    if path.is_dir():  # A folder's key covers its listing, so added or removed files count.
        listing = sorted((str(p), p.stat().st_size) for p in path.rglob("*") if p.is_file())
        fingerprint = hashlib.sha1(repr(listing).encode()).hexdigest()
    else:
        fingerprint = f"{stat.st_size}-{stat.st_mtime_ns}"
    key = hashlib.sha1(f"{_CACHE_VERSION}|{path.resolve()}|{fingerprint}".encode()).hexdigest()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root / f"{path.name}-{key[:16]}.npz"


def _write_cache(cache_file: Path, d: Dataset) -> None:
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        np.savez(
            tmp,
            train_images=d.train_images,
            train_labels=d.train_labels,
            test_images=d.test_images,
            test_labels=d.test_labels,
            class_names=np.asarray(d.class_names),
        )
        os.replace(tmp, cache_file)  # Atomic: readers see the old file or the whole new one.
    except OSError:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- tfds


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"dataset {name!r} needs TensorFlow Datasets: pip install 'qarjax[tfds]', or use "
            "imagefolder:<path> (e.g. the CIFAR-10 archive in shared/data)"
        ) from None
    try:
        splits, info = tfds.load(
            name,
            split=["train", "test"],
            batch_size=-1,
            as_supervised=True,
            data_dir=data_dir,
            with_info=True,
        )
    except Exception as e:  # tfds raises many types (network, missing builder, ...).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tfds could not load {name!r}: {first}") from None
    (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
    return Dataset(
        name,
        np.asarray(train_x, np.uint8),
        np.asarray(train_y, np.int32),
        np.asarray(test_x, np.uint8),
        np.asarray(test_y, np.int32),
        tuple(info.features["label"].names),
    )


# ----------------------------------------------------------------------------- on device


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> standardized floats of `dtype`."""
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def augment(images: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop after `pad`-pixel zero padding, and a random horizontal flip, per image.

    Runs on device inside the jitted step; works on uint8 so the gather stays cheap.
    """
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
            padded, offsets
        )
    if flip:
        do_flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    return images
