"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("QARJAX_TEST_NO_COMPILE_CACHE"):
    # One persistent compilation cache for the session, shared by the xdist workers and the
    # CLI subprocesses (they inherit the environment of the process that made it): the same
    # programs (a model's train step, its evaluation, its initializers...) compile once
    # instead of once per Trainer, per worker and per process. Fresh per session, removed at
    # exit by the process that made it.
    _cache = os.environ.get("QARJAX_TEST_COMPILE_CACHE")
    if not _cache or not os.path.isdir(_cache):
        _cache = tempfile.mkdtemp(prefix="qarjax_jax_cache_")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
        os.environ["QARJAX_TEST_COMPILE_CACHE"] = _cache
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
else:
    os.environ["QARJAX_COMPILATION_CACHE"] = "0"  # nor the one the CLI keeps in your home

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qarjax.config import default_config  # noqa: E402
from qarjax.data import Dataset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ["QARJAX_CACHE"] = str(tmp_path_factory.mktemp("qarjax_cache"))


def make_dataset(n_train=256, n_test=64, size=16, classes=4, seed=0) -> Dataset:
    """A learnable synthetic dataset: each class is a brightness pattern plus noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, classes, n).astype(np.int32)
        base = (labels[:, None, None, None] + 1) * (255 // (classes + 1))
        noise = rng.normal(0, 20, (n, size, size, 3))
        ramp = np.linspace(0, 40, size)[None, None, :, None] * (labels[:, None, None, None] % 2)
        return np.clip(base + noise + ramp, 0, 255).astype(np.uint8), labels

    tx, ty = split(n_train)
    vx, vy = split(n_test)
    return Dataset("synthetic", tx, ty, vx, vy, tuple(f"c{i}" for i in range(classes)))


@pytest.fixture
def tiny_config():
    """cnn_small on 16x16 synthetic images: a full train step in well under a second."""
    c = default_config()
    c.model = "cnn_small"
    c.num_epochs = 2
    c.batch_size = 32
    c.eval_batch_size = 64
    c.learning_rate = 0.05
    c.warmup_epochs = 0
    c.progress = False
    c.tensorboard = False
    return c


def pytest_report_header(config):
    return f"jax {jax.__version__}, {jax.device_count()} devices"


# The longest files start first, so neither xdist worker sits idle at the end waiting for the
# other's last long test (the order within each group is kept).
LONG_FIRST = ("test_notebook.py", "test_study.py", "test_every_model.py", "test_cli.py",
              "test_qat_training.py", "test_budget.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1] not in LONG_FIRST)
