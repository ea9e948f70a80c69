"""1-D k-means against the exact optimum (a plain float64 dynamic programme), dtypes, and the
nearest-centroid search."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO

from qarjax.kmeans import EXACT_MAX_N, assign, kmeans_1d

sys.path.insert(0, str(REPO / "experiments"))
from kmeans_quality import exact_optima  # noqa: E402

N = 432  # one small layer (3 x 3 x 3 x 16); every small case has this size: one compile per K


def _normal(n, seed):
    return np.random.default_rng(seed).normal(size=n)


def _student_t(n, seed):
    return np.random.default_rng(seed).standard_t(3, n)


def _bimodal(n, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(-3, 0.1, n // 2), rng.normal(2, 1, n - n // 2)])


def _kernel(n, seed):
    """A fresh 3 x 3 x 3 x 16 conv kernel as flax initialises it (lecun_normal: a normal
    truncated to +-2 sd, variance 1 / fan_in)."""
    assert n == N
    rng = np.random.default_rng(seed)
    z = rng.normal(size=4 * n)
    z = z[np.abs(z) <= 2][:n]
    return z / 0.87962566103423978 / np.sqrt(3 * 3 * 3)


def _outliers(n, seed):
    w = np.random.default_rng(seed).normal(size=n)
    w[:2] = [1e4, -3e3]  # the bulk's cell is wide at first
    return w


DATA = {"normal": _normal, "student_t": _student_t, "bimodal": _bimodal, "kernel": _kernel}


def plain_optimum(w, k):
    """The least sum of squared errors of k clusters: the optimal clusters are runs of the
    sorted values, best[j] = min over i < j of best_before[i] + cost(i, j), O(k n^2)."""
    x = np.sort(np.asarray(w, np.float64).ravel())
    x = x - x.mean()
    n = x.size
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    size = np.maximum(j - i, 1)
    cost = np.where(i < j, s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / size, np.inf)
    best = cost[0]
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return best[n]


def fast_optimum(w, k):
    """The same optimum for larger n, O(k n log n): experiments/kmeans_quality.py's
    divide-and-conquer programme (one reference for the test and the quality figures)."""
    return exact_optima(w, [k])[k]


@functools.cache
def _case(name, k):
    w = np.asarray(DATA[name](N, 0), np.float32).astype(np.float64)  # the same in both dtypes
    return w, plain_optimum(w, k)


def _check(w, centroids, k, optimum, dtype, slack=1.01):
    assert centroids.shape == (k,) and centroids.dtype == np.dtype(dtype)
    c = np.asarray(centroids, np.float64)
    assert np.all(np.diff(c) >= 0), "centroids sorted"
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, w, side="left")  # as assign (tested below)
    error = np.sum((np.asarray(w, np.float64) - c[labels]) ** 2)
    assert error <= slack * optimum, (error / optimum, k)
    assert np.unique(labels).size == min(k, np.unique(w).size), "no dead clusters"


def test_reference_programmes_agree():
    for seed, k in [(1, 2), (2, 5), (3, 40)]:
        w = _student_t(300, seed)
        assert fast_optimum(w, k) == pytest.approx(plain_optimum(w, k), rel=1e-9)
    w = np.array([0.0, 1.0, 10.0, 11.0])
    assert plain_optimum(w, 2) == pytest.approx(1.0)


MODES = [("float32", False, k) for k in (2, 4, 16, 64, 256)]
MODES += [("float64", True, k) for k in (2, 4, 16, 64, 256)]
MODES += [("float32", True, 256)]  # float32 weights with x64 enabled


@pytest.mark.parametrize("dtype, x64, k", MODES)
def test_within_one_percent_of_the_exact_optimum(dtype, x64, k):
    """Normal, Student-t(3), bimodal and a freshly initialised 3 x 3 x 3 x 16 kernel: the
    programme runs on the weights themselves here, so float32 cancellation in its costs was
    the risk (prefix sums of u^2 reached 1.12x with 2 dead clusters on such a kernel)."""
    with jax.enable_x64(x64):
        for name in DATA:
            w, optimum = _case(name, k)
            _check(w.astype(dtype), kmeans_1d(jnp.asarray(w, dtype), k), k, optimum, dtype)


M = 3000  # beyond EXACT_MAX_N: atoms, then refinement rounds


@pytest.mark.parametrize("dtype, x64", [("float32", False), ("float32", True), ("float64", True)])
def test_heavy_tails_beyond_the_exact_size(dtype, x64):
    """Student-t(3): the uniform-histogram start left too few centroids in the bulk (1.25x
    the optimum at K = 256 on these values, 1.75x on 200,000); under x64 the start put an
    int / 2 (float64) into the float32 Lloyd loop's carry, which did not compile."""
    assert M > EXACT_MAX_N
    w = np.asarray(_student_t(M, 0), np.float32).astype(np.float64)
    with jax.enable_x64(x64):
        k = 256 if dtype == "float32" and not x64 else 64
        centroids = kmeans_1d(jnp.asarray(w, dtype), k)
        _check(w.astype(dtype), centroids, k, fast_optimum(w, k), dtype)


def test_far_outliers_beyond_the_exact_size():
    """Two far outliers make the bulk's cell wide at first; it must still get its clusters."""
    w = np.asarray(_outliers(M, 1), np.float32)
    _check(w, kmeans_1d(jnp.asarray(w), 256), 256, fast_optimum(w, 256), np.float32)


def test_fewer_distinct_values_than_clusters():
    w = np.asarray(np.random.default_rng(0).integers(0, 10, N) * 0.1, np.float32)
    c = kmeans_1d(jnp.asarray(w), 16)
    assert np.all(np.diff(np.asarray(c)) >= 0)
    labels = np.asarray(assign(jnp.asarray(w), c))
    np.testing.assert_allclose(np.asarray(c)[labels], w, atol=1e-6)  # every value its own
    c = kmeans_1d(jnp.asarray(w[:10]), 16)  # fewer weights than clusters: repeats
    assert c.shape == (16,) and np.all(np.diff(np.asarray(c)) >= 0)
    assert set(np.asarray(c).tolist()) <= set(w[:10].tolist())


def test_more_clusters_than_the_programme_handles():
    w = np.asarray(_normal(3000, 0), np.float32)
    c = np.asarray(kmeans_1d(jnp.asarray(w), 300))
    assert c.shape == (300,) and np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)


@pytest.mark.parametrize("k", [16, 200, 1100])  # all compared, two levels, binary search
def test_assign_is_the_nearest_centroid(k):
    rng = np.random.default_rng(k)
    centroids = np.sort(rng.normal(size=k)).astype(np.float32)
    centroids[k // 2] = centroids[k // 2 - 1]  # a repeated centroid
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    w = np.concatenate([rng.normal(size=(501 - k % 4,)) * 1.5, midpoints]).astype(np.float32)
    want = np.searchsorted(midpoints, w, side="left")
    got = np.asarray(jax.jit(assign)(jnp.asarray(w).reshape(-1, 4), jnp.asarray(centroids)))
    np.testing.assert_array_equal(got.ravel(), want)
    padded = jnp.concatenate([jnp.asarray(centroids), jnp.full((3,), jnp.inf)])  # a grid's padding
    np.testing.assert_array_equal(np.asarray(jax.jit(assign)(jnp.asarray(w), padded)), want)
