"""How close qarjax.kmeans.kmeans_1d comes to the exact 1-D k-means optimum: Student-t(3) and
normal samples (200,000 values each by default) at several K, float32. For each: the ratio of
kmeans_1d's sum of squared errors to the exact optimum, its dead clusters and its time (first
call, which compiles, and the median of the repeats), and the same for scikit-learn's KMeans
(n_init=1, k-means++) when it is importable. Writes JSON.

    python experiments/kmeans_quality.py --out runs/kmeans_quality.json
    python experiments/kmeans_quality.py --baseline /tmp/old_kmeans.py  # another version too

The exact optimum: the clusters of an optimal 1-D k-means are runs of the sorted values, so
best[m, j] = min_{i<j} best[m-1, i] + cost(i, j) over the sorted values (float64 NumPy,
prefix sums of the centred values); the minimising i is monotone in j, so each of the K-1
layers is divide and conquer over j, a whole recursion level at a time: O(K n log n), one
pass up to the largest K gives every smaller K on the way.
"""

import argparse
import importlib.util
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import device_name, write_json

from qarjax import kmeans


def exact_optima(values: np.ndarray, ks: list[int]) -> dict[int, float]:
    """{k: the least sum of squared errors of k clusters} for each k in ks (see the docstring)."""
    x = np.sort(np.asarray(values, np.float64).ravel())
    x = x - x.mean()
    n = x.size
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])

    def cost(i, j):
        return np.maximum(s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / np.maximum(j - i, 1), 0.0)

    best = cost(np.zeros(n + 1, np.int64), np.arange(n + 1))
    found = {1: best[n]} if 1 in ks else {}
    for m in range(2, max(ks) + 1):
        new = np.full(n + 1, np.inf)
        lo_j, hi_j, lo_i, hi_i = (np.array([v]) for v in (1, n, 0, n - 1))
        while lo_j.size:
            mid = (lo_j + hi_j) // 2
            width = np.minimum(hi_i, mid - 1) - lo_i + 1
            first = np.concatenate([[0], np.cumsum(width)[:-1]])
            owner = np.repeat(np.arange(mid.size), width)
            i = np.arange(owner.size) - first[owner] + lo_i[owner]
            total = best[i] + cost(i, mid[owner])
            low = np.minimum.reduceat(total, first)
            arg = np.minimum.reduceat(np.where(total <= low[owner], i, n), first)
            new[mid] = low
            left, right = lo_j < mid, mid < hi_j
            lo_j, hi_j, lo_i, hi_i = (
                np.concatenate([lo_j[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, hi_j[right]]),
                np.concatenate([lo_i[left], arg[right]]),
                np.concatenate([arg[left], hi_i[right]]),
            )
        best = new
        if m in ks:
            found[m] = best[n]
    return found


def sse_and_dead(values: np.ndarray, centroids: np.ndarray) -> tuple[float, int]:
    """Error of the nearest-centroid assignment (ties to the lower one, as kmeans.assign)."""
    c = np.sort(np.asarray(centroids, np.float64))
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, values, side="left")
    return float(np.sum((values - c[labels]) ** 2)), int(c.size - np.unique(labels).size)


def time_jax(fn, w, k: int, repeats: int) -> tuple[np.ndarray, float, float]:
    began = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(w, k)))
    first = time.perf_counter() - began
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn(w, k))
        times.append(time.perf_counter() - began)
    return out, first, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--ks", default="16,64,192,256")
    parser.add_argument("--data", default="student_t3,normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--baseline", default=None, help="another kmeans.py to measure as well")
    parser.add_argument("--out", default=None, help="e.g. runs/kmeans_quality.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    samples = {
        "student_t3": lambda rng: rng.standard_t(3, args.n),
        "normal": lambda rng: rng.normal(size=args.n),
    }
    versions = {"kmeans_1d": kmeans}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_kmeans", args.baseline)
        versions["baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions["baseline"])
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        KMeans = None
    if args.no_sklearn:
        KMeans = None
    rows = []
    for name in args.data.split(","):
        sample = samples[name](np.random.default_rng(args.seed))
        values = np.asarray(sample.astype(np.float32), np.float64)  # what float32 holds
        began = time.perf_counter()
        optima = exact_optima(values, ks)
        print(f"{name}: exact optima for K in {ks} in {time.perf_counter() - began:.1f} s")
        w = jnp.asarray(values, jnp.float32)
        for k in ks:
            row = {"data": name, "n": args.n, "k": k, "optimum": optima[k]}
            for label, module in versions.items():
                centroids, first, seconds = time_jax(module.kmeans_1d, w, k, args.repeats)
                error, dead = sse_and_dead(values, centroids)
                row[label] = {"error": error, "ratio": error / optima[k], "dead": dead,
                              "seconds": seconds, "first_call_seconds": first}  # fmt: skip
            if KMeans is not None:
                began = time.perf_counter()
                fit = KMeans(k, n_init=1, random_state=0).fit(values.reshape(-1, 1))
                seconds = time.perf_counter() - began
                error, dead = sse_and_dead(values, fit.cluster_centers_.ravel())
                row["sklearn"] = {"error": error, "ratio": error / optima[k], "dead": dead,
                                  "seconds": seconds}  # fmt: skip
            rows.append(row)
            line = "  ".join(
                f"{label} {row[label]['ratio']:.5f}x ({row[label]['dead']} dead, "
                f"{row[label]['seconds']:.3f} s)"
                for label in [*versions, "sklearn"]
                if label in row
            )
            print(f"{name:>11} K={k:<4d} {line}", flush=True)
    write_json(args.out, {"device": device_name(), "dtype": "float32", "seed": args.seed,
                          "optimum": "exact, float64 divide-and-conquer DP (see docstring)",
                          "results": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
