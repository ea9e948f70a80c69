"""Datasets as uint8 arrays: loading, caching, and on-device augmentation.

A dataset is loaded once into host memory as uint8 NHWC arrays (`Dataset`), then placed on the
accelerator whole; batches are gathered, augmented (random crop with padding, horizontal flip)
and normalized inside the jitted step, so an epoch needs no host round trips.

Images keep the channels they have (``config.dataset_channels``: 0): a folder of grayscale
images loads as one channel, any colour image makes it three; 1 or 3 converts (luminance as
PIL computes it, or the gray channel repeated). Augmentation is ``config.augment``: a key left
at None takes the dataset's default (`resolve_augmentation`): a random crop after zero padding
of an eighth of the image side (4 pixels on CIFAR's 32x32) for every dataset, and a random
horizontal flip for CIFAR-10 only (``cifar10``, ``cifar10_mini``), as an image folder or
another tfds set may hold digits or text that a mirror changes.

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
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qarjax.errors import ConfigError, DataError, QarjaxError, short
from qarjax.files import write_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes decoded as one channel
CHANNELS = (0, 1, 3)  # dataset_channels: as the data has them, gray, RGB
FLIP_BY_DEFAULT = ("cifar10", "cifar10_mini")  # datasets whose mirror images are valid images
MINI_ARCHIVE = Path(__file__).parent / "assets" / "cifar10_mini.tar.gz"
MAX_IMAGE_FILE_BYTES = 64 << 20  # PIL refuses more than ~179 M pixels anyway
_CACHE_VERSION = "v3"  # v2: grayscale images keep one channel; v3: 16-bit gray scaled


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset held as host arrays.

    Attributes:
      name: the name it was loaded by.
      train_images, test_images: uint8 arrays of shape (N, H, W, C).
      train_labels, test_labels: int32 arrays of shape (N,).
      class_names: the class of each label index.
      normalization: the per-channel (mean, std) the images are normalized by; None (the
        default): the training images' own. `split_for_tuning`'s parts keep the whole
        one's, so a tuned model sees its images normalized as in the run that trained it.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    normalization: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def channel_mean(self) -> np.ndarray:
        if self.normalization is not None:
            return self.normalization[0]
        return self.train_images.reshape(-1, self.image_shape[-1]).mean(0).astype(np.float32)

    @property
    def channel_std(self) -> np.ndarray:
        if self.normalization is not None:
            return self.normalization[1]
        return self.train_images.reshape(-1, self.image_shape[-1]).std(0).astype(np.float32)


EVAL_SPLITS = ("test", "holdout")
HOLDOUT_SEED = 20_260_101  # one fixed draw: every run of a study holds out the same images


def check_split(n, eval_split: str) -> None:
    """`n` held-out images and the evaluation split, as `with_holdout` takes them (the data's
    size aside: checked there)."""
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"eval_split must be one of {EVAL_SPLITS}, got {short(eval_split)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"holdout must be a whole number >= 0, got {short(n)}")
    if n == 0 and eval_split == "holdout":
        raise ConfigError("eval_split 'holdout' needs holdout > 0 (images to hold out)")


def with_holdout(dataset: Dataset, n: int, eval_split: str = "test") -> Dataset:
    """`dataset` with `n` training images held out (a fixed seeded draw, the same for every
    run): it trains on the rest; with ``eval_split="holdout"`` the held-out images replace
    the test split (a validation set for choosing settings, never the test set).

    Runs with the same `n` train on identical data in the same order whatever their
    `eval_split`, so a search on the held-out images and the final runs can branch off one
    plain run.

    >>> d = Dataset("d", np.zeros((10, 2, 2, 1), np.uint8), np.arange(10, dtype=np.int32),
    ...             np.zeros((3, 2, 2, 1), np.uint8), np.zeros(3, np.int32), ("a",))
    >>> v = with_holdout(d, 4, "holdout")
    >>> len(v.train_labels), sorted(v.train_labels.tolist() + v.test_labels.tolist())
    (6, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    check_split(n, eval_split)
    if n == 0:
        return dataset
    total = len(dataset.train_labels)
    if n >= total:
        raise ConfigError(f"holdout {n} leaves none of the {total} training images to train on")
    held, kept = _draw(total, n, HOLDOUT_SEED)
    out = dataclasses.replace(
        dataset, train_images=dataset.train_images[kept], train_labels=dataset.train_labels[kept]
    )
    if eval_split == "holdout":
        out = dataclasses.replace(
            out, test_images=dataset.train_images[held], test_labels=dataset.train_labels[held]
        )
    return out


TUNE_SEED = 20_260_202  # the images tuning holds out to score on: one fixed draw per dataset


def split_for_tuning(dataset: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """(tune, score): `dataset` with `fraction` of its training images held out (a fixed
    seeded draw), and those images as a dataset of their own (train and test alike), on which
    tuning scores its codebooks; the test split is left alone.

    >>> d = Dataset("d", np.zeros((10, 2, 2, 1), np.uint8), np.arange(10, dtype=np.int32),
    ...             np.zeros((3, 2, 2, 1), np.uint8), np.zeros(3, np.int32), ("a",))
    >>> tune, score = split_for_tuning(d, 0.2)
    >>> len(tune.train_labels), sorted(tune.train_labels.tolist() + score.test_labels.tolist())
    (8, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    total = len(dataset.train_labels)
    n = int(round(fraction * total))
    if not 0 < n < total:
        raise ConfigError(
            f"quant.tune_holdout {fraction} of {total} training images holds out {n}: "
            "it must leave some to score on and some to tune on"
        )
    held, kept = _draw(total, n, TUNE_SEED)
    images, labels = dataset.train_images[held], dataset.train_labels[held]
    # both parts keep the whole training set's normalization: the one the model trained with
    norm = (dataset.channel_mean, dataset.channel_std)
    tune = dataclasses.replace(
        dataset, train_images=dataset.train_images[kept], train_labels=dataset.train_labels[kept],
        normalization=norm,
    )  # fmt: skip
    score = dataclasses.replace(
        dataset, train_images=images, train_labels=labels, test_images=images, test_labels=labels,
        normalization=norm,
    )  # fmt: skip
    return tune, score


def _draw(total: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held, kept): sorted indices of `n` of `total` images drawn by `seed`, and the rest."""
    order = np.random.default_rng(seed).permutation(total)
    return np.sort(order[:n]), np.sort(order[n:])


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    channels: int = 0,
    holdout: int = 0,
    eval_split: str = "test",
) -> Dataset:
    """Loads a dataset by name (see the module docstring for the names).

    `channels`: 0 keeps the data's own (gray folders: 1), 1 or 3 converts to that many.
    `holdout`, `eval_split`: see `with_holdout`.
    """
    if channels not in CHANNELS or isinstance(channels, bool):
        raise ConfigError(f"dataset_channels must be one of {CHANNELS}, got {channels!r}")
    if name == "cifar10_mini":
        dataset = dataclasses.replace(_load_image_folder(MINI_ARCHIVE, cache_dir), name=name)
    elif name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        dataset = dataclasses.replace(_load_image_folder(path, cache_dir), name=name)
    elif name == "cifar10" or name.startswith("tfds:"):
        dataset = _load_tfds(name.removeprefix("tfds:"), data_dir)
    else:
        raise DataError(
            f"unknown dataset {name!r}: use cifar10_mini, imagefolder:<path>, cifar10 or "
            "tfds:<name>"
        )
    if channels and dataset.image_shape[-1] != channels:
        dataset = dataclasses.replace(
            dataset,
            train_images=to_channels(dataset.train_images, channels),
            test_images=to_channels(dataset.test_images, channels),
        )
    return with_holdout(dataset, holdout, eval_split)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC images with 1 or 3 channels -> `channels` channels: RGB to gray is PIL's
    luminance (L = 0.299 R + 0.587 G + 0.114 B, its fixed-point rounding), gray to RGB
    repeats the channel."""
    have = images.shape[-1]
    if have == channels:
        return images
    if (have, channels) == (1, 3):
        return np.repeat(images, 3, axis=-1)
    if (have, channels) == (3, 1):
        rgb = images.astype(np.uint32)
        gray = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return gray.astype(np.uint8)[..., None]
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


# ----------------------------------------------------------------------------- image folders


def _load_image_folder(path: Path, cache_dir: str | None) -> Dataset:
    if not path.exists():
        raise DataError(f"dataset path does not exist: {path}")
    if not (path.is_dir() or path.is_file()):  # a FIFO or a device would block or never end
        raise DataError(f"dataset path {path} is neither a folder nor an archive file")
    cache_file = _cache_path(path, cache_dir)
    if cache_file is not None and cache_file.is_file():
        cached = _read_cache(cache_file, path)
        if cached is not None:
            return cached
    files = dict(_list_images(path))
    dataset = _decode_splits(path, files)
    if cache_file is not None:
        _write_cache(cache_file, dataset)
    return dataset


def _read_cache(cache_file: Path, path: Path) -> Dataset | None:
    """The cached arrays if they make a well-formed dataset, else None (and the file gone):
    a broken or crafted cache is rebuilt, never trusted."""
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            d = Dataset(
                name=str(path),
                train_images=z["train_images"],
                train_labels=z["train_labels"],
                test_images=z["test_images"],
                test_labels=z["test_labels"],
                class_names=tuple(str(c) for c in z["class_names"]),
            )
        splits = ((d.train_images, d.train_labels), (d.test_images, d.test_labels))
        shape = d.train_images.shape[1:]
        ok = len(d.class_names) >= 2 and all(
            x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == shape and x.shape[-1] in (1, 3)
            and y.dtype == np.int32 and y.shape == (len(x),) and len(x) > 0
            and 0 <= y.min() and y.max() < len(d.class_names)
            for x, y in splits
        )  # fmt: skip
        if ok:
            return d
    except Exception:  # noqa: BLE001 - any failure to read it means: rebuild
        pass
    try:
        cache_file.unlink()
    except OSError:
        pass
    return None


def _check_image_size(name: str, size: int) -> None:
    if size > MAX_IMAGE_FILE_BYTES:
        raise DataError(
            f"image {name} is {size:,} bytes: refused unread, an image file may be at most "
            f"{MAX_IMAGE_FILE_BYTES >> 20} MiB"
        )


def _list_images(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yields (relative name, file bytes) for every image file under a folder or archive
    (each checked against MAX_IMAGE_FILE_BYTES before it is read)."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                name = file.relative_to(path).as_posix()
                try:
                    _check_image_size(name, file.stat().st_size)
                    content = file.read_bytes()
                except OSError as e:  # unreadable, or removed since the listing
                    raise DataError(f"cannot read image {file}: {e.strerror or e}") from None
                yield name, content
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    _check_image_size(member.name, member.size)
                    yield member.name, archive.extractfile(member).read()
            _check_archive_end(archive, path)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from None


def _check_archive_end(archive: tarfile.TarFile, path: Path) -> None:
    """Refuses an archive whose listing ended before its end: tarfile takes a damaged header
    after the first for the end of the archive, so what follows the last member must be the
    zero padding; read to the end, which also checks a compressed stream's checksum."""
    stream = archive.fileobj
    stream.seek(archive.offset)
    while chunk := stream.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise DataError(
                f"cannot read archive {path}: its listing ends at a damaged header (byte "
                f"{archive.offset} of its tar stream), not at its end"
            )


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
    if len(class_names) < 2:
        raise DataError(
            f"{path} has one class under train/ ({class_names[0]}): classification needs two "
            "or more"
        )
    unknown = sorted(set(by_split["test"]) - set(class_names))
    if unknown:
        raise DataError(f"{path}: test classes {unknown} have no train images")
    arrays = {}
    for split in ("train", "test"):
        names = [n for c in class_names for n in by_split[split].get(c, [])]
        labels = [i for i, c in enumerate(class_names) for _ in by_split[split].get(c, [])]
        arrays[split] = (_decode_all(names, files), np.asarray(labels, np.int32))
    channels = max(images.shape[-1] for images, _ in arrays.values())  # colour anywhere: RGB
    arrays = {k: (to_channels(images, channels), y) for k, (images, y) in arrays.items()}
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
    """(H, W, 1) for a grayscale image, else (H, W, 3) RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit gray (PNG, TIFF)
                # PIL's convert("L") clips these at 255; scale the 16-bit range instead
                wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
                return ((wide * 255 + 32767) // 65535).astype(np.uint8)[..., None]
            if image.mode in GRAY_MODES:
                return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {name} is refused as too large: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


def _decode_all(names: list[str], files: dict[str, bytes]) -> np.ndarray:
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(lambda n: _decode_one(n, files[n]), names, chunksize=256))
    channels = max(image.shape[-1] for image in images)  # one colour image: all RGB
    images = [to_channels(image, channels) for image in images]
    shape = images[0].shape
    for name, image in zip(names, images, strict=True):
        if image.shape != shape:
            raise DataError(f"image {name} has shape {image.shape}, expected {shape}")
    return np.stack(images)


def _cache_path(path: Path, cache_dir: str | None) -> Path | None:
    root = Path(cache_dir or os.environ.get("QARJAX_CACHE", "~/.cache/qarjax")).expanduser()
    stat = path.stat()
    if path.is_dir():  # A folder's key covers its listing: added, removed or rewritten files
        try:
            stats = ((p, p.stat()) for p in path.rglob("*") if p.is_file())
            listing = sorted((str(p), st.st_size, st.st_mtime_ns) for p, st in stats)
        except OSError:  # a file removed while listed: no cache (the read names the problem)
            return None
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
    """Best effort: a cache that cannot be written (a full disk, a read-only place) is none."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(
                f,
                train_images=d.train_images,
                train_labels=d.train_labels,
                test_images=d.test_images,
                test_labels=d.test_labels,
                class_names=np.asarray(d.class_names),
            )

    try:
        write_atomic(cache_file, write, "dataset cache")
    except QarjaxError:
        pass


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


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The train step's augmentation, resolved for a dataset (`resolve_augmentation`).

    Attributes:
      crop_padding: zero padding in pixels before the random crop back to size; 0: no crop.
      flip: a random horizontal flip per image.
      origin: where each value came from, for the log ("the config" or the dataset default).
    """

    crop_padding: int
    flip: bool
    origin: tuple[str, str] = ("the config", "the config")

    def describe(self) -> str:
        crop = (
            f"random crop after {self.crop_padding}-pixel padding"
            if self.crop_padding
            else "no crop"
        )
        flip = "random horizontal flip" if self.flip else "no flip"
        return f"augmentation: {crop} ({self.origin[0]}), {flip} ({self.origin[1]})"


def resolve_augmentation(augment_config, dataset: Dataset) -> Augmentation:
    """`config.augment` for `dataset`: a key left at None takes the dataset's default (see the
    module docstring); an explicit value always wins. Refuses bad values (ConfigError)."""
    h, w, _ = dataset.image_shape
    default = f"{dataset.name}'s default"
    pad, flip = augment_config.crop_padding, augment_config.flip
    origin = (
        "the config" if pad is not None else default,
        "the config" if flip is not None else default,
    )
    check_augmentation(pad, flip)
    pad = min(h, w) // 8 if pad is None else pad
    flip = dataset.name in FLIP_BY_DEFAULT if flip is None else flip
    if pad >= min(h, w):
        raise ConfigError(
            f"augment.crop_padding={pad} must be smaller than the {h}x{w} images' side"
        )
    return Augmentation(int(pad), bool(flip), origin)


def check_augmentation(pad, flip) -> None:
    """`config.augment`'s values (None: the dataset's default); the crop against the image
    size is checked by `resolve_augmentation`."""
    bad_pad = isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0
    if pad is not None and bad_pad:
        raise ConfigError(
            f"augment.crop_padding must be an integer >= 0 (0: no crop), got {short(pad)}"
        )
    if flip is not None and not isinstance(flip, bool | np.bool_):
        raise ConfigError(f"augment.flip must be True or False, got {short(flip)}")


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
