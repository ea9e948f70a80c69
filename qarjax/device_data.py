"""The dataset on the devices, whole, as uint8: placed once, gathered and augmented in the step.

`DeviceData` replicates the training and test arrays over the mesh (the test split padded to
whole evaluation batches, with a mask), so a training step gathers its batch by index on the
device; `prepare` augments and normalizes a gathered batch inside the jitted step, and
`epoch_order` draws an epoch's batches from the run's key (the shape of big_vision's
input pipeline, for data that fits in device memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qarjax import data as data_lib

EPOCH_SALT = 1_000_003  # keeps the data-order keys apart from the per-step keys


def put_replicated(tree, mesh: Mesh):
    """Host arrays -> global arrays replicated on every device of the mesh (multi-host safe)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


class DeviceData:
    """A `qarjax.data.Dataset` replicated on a mesh.

    Attributes:
      arrays: train_images, train_labels, test_images, test_labels, test_mask, mean, std
        (global arrays).
      eval_batch_size: the evaluation batch (a multiple of the device count).
      batch_sharding: how a batch is split over the mesh's ``data`` axis.
    """

    def __init__(self, dataset: data_lib.Dataset, mesh: Mesh, eval_batch_size: int):
        n_dev = mesh.devices.size
        self.eval_batch_size = bs = max(n_dev, eval_batch_size // n_dev * n_dev)
        n_test = len(dataset.test_labels)
        pad = -(-n_test // bs) * bs - n_test
        zeros = np.zeros((pad, *dataset.image_shape), np.uint8)
        host = {
            "train_images": dataset.train_images,
            "train_labels": dataset.train_labels,
            "test_images": np.concatenate([dataset.test_images, zeros]),
            "test_labels": np.concatenate([dataset.test_labels, np.zeros(pad, np.int32)]),
            "test_mask": np.concatenate([np.ones(n_test, np.float32), np.zeros(pad, np.float32)]),
            "mean": dataset.channel_mean,
            "std": dataset.channel_std,
        }
        self.arrays = put_replicated(host, mesh)
        self.num_train = len(dataset.train_labels)
        self.batch_sharding = NamedSharding(mesh, P("data"))


def prepare(images, arrays: dict, dtype, key=None, augmentation=None):
    """Augments (with `key`: random crop and flip as `augmentation` says) and normalizes a
    gathered uint8 batch."""
    if key is not None and augmentation is not None:
        images = data_lib.augment(
            images, key, pad=augmentation.crop_padding, flip=augmentation.flip
        )
    return data_lib.normalize(images, arrays["mean"], arrays["std"], dtype)


def epoch_order(rng, epoch, *, num_train: int, steps: int, batch_size: int) -> jax.Array:
    """The (steps, batch_size) training indices of an epoch, from the run's key and the
    epoch number (so a resumed run repeats them)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), EPOCH_SALT + epoch)
    perm = jax.random.permutation(key, num_train)[: steps * batch_size]
    return perm.reshape(steps, batch_size).astype(jnp.int32)
