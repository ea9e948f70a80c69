"""1-D k-means for weight sharing, jitted on the device.

Lloyd's algorithm only descends to a fixed point, and an empirical weight distribution has
many: from the K quantiles it stops far above the error that scikit-learn's k-means++
reaches (the figures behind this module's choices: results/design_measurements.md). In one
dimension the optimum is computable: the optimal clusters are runs of the sorted weights,
and a dynamic programme over the run boundaries finds the best k runs (as Ckmeans.1d.dp
does). Over n points that is O(K n^2), so for K <= DP_MAX_K this module runs it over
*atoms*, groups of weights that a cluster takes whole, each a (count, mean):

- n <= EXACT_MAX_N: the atoms are the sorted weights themselves, so the result is the exact
  optimum (Lloyd then has nothing left to move).
- Otherwise, rounds: each current centroid's Voronoi cell (clipped to the weights' range) is
  cut into `per` = (512 to 2048) / K atoms, and the programme picks the best K runs of them;
  their means are the next centroids. The first cells are those of K evenly spaced centroids.
  The current partition is one of the candidates, so a round never loses, and the programme
  can move any boundary or hand a cluster from one end of the range to the other, which
  Lloyd cannot. Each round resolves the bulk more finely where the clusters went, so a
  heavy-tailed layer does not keep the few bulk centroids that an even start gives it (as the
  former start, the programme over a uniform histogram, did). A cell whose weights gather
  in a small part of it (a far outlier makes the bulk's cell wide at first) is cut evenly
  in z / (1 + |z|), z = (w - centroid) / (mean |w - centroid| in the cell), instead of
  evenly in w. Rounds stop when the programme beats the cells' own partition by less than
  ROUND_RTOL, or after MAX_ROUNDS; Lloyd then polishes on the weights.

The programme: best[m, j] = min_{i<j} best[m-1, i] + cost(i, j), cost(i, j) the squared error
of atoms i..j-1 around their mean. The costs come from Welford's update, atom j added to the
runs from every start i at once (cost(i, j+1) = cost(i, j) + n_j N / (N + n_j) (x_j - mean)^2,
B sequential steps of O(B) work): prefix sums of x^2 cancel catastrophically in float32 (dead
clusters on a small kernel at K = 256). The minimising i
is monotone in j, so when K B^2 is large each of the K-1 layers is divide and conquer over j,
a whole level of the recursion at once (O(B log B) per layer, not O(B^2)).

Its error against the exact optimum and scikit-learn's KMeans: experiments/kmeans_quality.py,
results/kmeans_quality_cpu.json.

Lloyd step: with the centroids sorted, a weight's cluster is the number of the K-1 midpoints
below it (all compared at once up to K = 129, a two-level count up to K = 1025, binary search
beyond), and the new centroids are segment sums of the offsets from the old ones. Empty
clusters keep their old value. For K > DP_MAX_K the start is the companded one (quantiles of
hist^(1/3), Panter & Dite) or the plain quantiles, the better of the two after Lloyd.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DP_MAX_K = 256  # above this, Lloyd from the companded start (the programme is O(K B log B))
EXACT_MAX_N = 2048  # up to this many weights, the programme runs on the weights themselves
MAX_ROUNDS = 8  # runs of the programme over cell atoms at most
ROUND_RTOL = 1e-4  # the last is the one whose partition beats the cells' by less (relative)
LLOYD_RTOL = 1e-6  # Lloyd stops when a step gains less than this (relative)


def assign(w: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid for each weight; `centroids` must be sorted ascending.

    Ties go to the lower centroid (the count of midpoints strictly below the weight)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    m = midpoints.shape[0]
    if m <= 128:  # all compared at once: fused, and the fastest up to here on CPU and GPU
        return _count_below(w, midpoints)
    if m <= 1024:  # every 8th midpoint first, then the 7 within the group
        coarse = _count_below(w, midpoints[7::8])
        base = coarse * 8
        padded = jnp.concatenate([midpoints, jnp.full((8,), jnp.inf, midpoints.dtype)])
        fine = padded[base[..., None] + jnp.arange(7)]
        return base + jnp.sum(w[..., None] > fine, axis=-1, dtype=jnp.int32)
    return jnp.searchsorted(midpoints, w, side="left", method="scan_unrolled").astype(jnp.int32)


def _count_below(w: jax.Array, sorted_values: jax.Array) -> jax.Array:
    count = jnp.zeros(jnp.shape(w), jnp.int32)
    for s in range(0, sorted_values.shape[0], 16):
        count = count + jnp.sum(w[..., None] > sorted_values[s : s + 16], axis=-1, dtype=jnp.int32)
    return count


def within_cluster_error(w: jax.Array, centroids: jax.Array) -> jax.Array:
    """Sum of squared distances of the weights to their nearest centroid (sorted centroids)."""
    w = jnp.ravel(w)
    return jnp.sum((w - centroids[assign(w, centroids)]) ** 2)


def _sums(values: jax.Array, segments: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(count, sum of values) per segment, in one pass."""
    both = jnp.stack([jnp.ones_like(values), values], axis=1)
    return tuple(jax.ops.segment_sum(both, segments, num_segments=k).T)


def _lloyd(w: jax.Array, init: jax.Array, k: int, max_iter: int, tol: jax.Array) -> jax.Array:
    """Lloyd from `init` until no centroid moves more than tol, a step gains less than
    LLOYD_RTOL of the error, or max_iter steps."""

    def step(carry):
        centroids, _, _, i = carry
        labels = assign(w, centroids)
        offset = w - centroids[labels]  # sums of offsets: no cancellation in float32
        counts, sums = _sums(offset, labels, k)
        move = sums / jnp.maximum(counts, 1)
        error = jnp.sum(offset * offset)
        gain = jnp.sum(move * sums) / jnp.maximum(error, jnp.finfo(w.dtype).tiny)
        new = jnp.sort(centroids + move)
        return new, jnp.max(jnp.abs(move)), gain, i + 1

    def keep_going(carry):
        _, shift, gain, i = carry
        return (i < max_iter) & (shift > tol) & (gain > LLOYD_RTOL)

    inf = jnp.asarray(jnp.inf, w.dtype)
    start = (jnp.sort(init).astype(w.dtype), inf, inf, jnp.asarray(0, jnp.int32))
    return jax.lax.while_loop(keep_going, step, start)[0]


@functools.partial(jax.jit, static_argnames=("k", "max_iter"))
def kmeans_1d(w: jax.Array, k: int, *, max_iter: int = 100, tol: float = 1e-5) -> jax.Array:
    """K sorted centroids of the flattened weights `w` (float32 or float64).

    Args:
      w: weights, any shape.
      k: number of clusters, K >= 2 (K > number of distinct weights leaves duplicates).
      max_iter: Lloyd iterations at most (after the programme; per start for K > DP_MAX_K).
      tol: Lloyd stops when no centroid moves by more than tol * (max(w) - min(w)), or when a
        step lowers the error by less than LLOYD_RTOL of it.

    Returns:
      The centroids, shape (K,), sorted ascending, in w's dtype (float32 for integers).

    >>> [round(c, 3) for c in kmeans_1d(jnp.array([0.0, 0.1, 0.2, 5.0, 5.2, 9.0]), 3).tolist()]
    [0.1, 5.1, 9.0]
    """
    out_dtype = w.dtype if jnp.issubdtype(w.dtype, jnp.floating) else jnp.float32
    w = jnp.ravel(w).astype(jnp.promote_types(w.dtype, jnp.float32))
    n = w.shape[0]
    tol = tol * (jnp.max(w) - jnp.min(w))
    if k > DP_MAX_K:
        levels = (jnp.arange(k, dtype=w.dtype) + 0.5) / k
        candidates = [
            _lloyd(w, _companded_start(w, levels), k, max_iter, tol),
            _lloyd(w, jnp.quantile(w, levels), k, max_iter, tol),
        ]
        errors = jnp.stack([within_cluster_error(w, c) for c in candidates])
        return jnp.stack(candidates)[jnp.argmin(errors)].astype(out_dtype)
    if n <= EXACT_MAX_N:
        x = jnp.sort(w)
        fit = min(k, n)
        centroids, _ = _optimal_runs(x, jnp.ones_like(x), fit)
        centroids = _lloyd(w, centroids, fit, max_iter, tol)
        if fit < k:  # fewer weights than clusters: repeat the largest
            centroids = jnp.concatenate([centroids, jnp.full((k - fit,), centroids[-1])])
        return centroids.astype(out_dtype)
    per = max(1, min(2048, max(512, 16 * k)) // k)  # atoms per cell: 512 to 2048 atoms

    def refine(carry):
        centroids, _, r = carry
        x, m = _cell_atoms(w, centroids, per)
        new, cost = _optimal_runs(x, m, k)
        current = _run_costs(x, m, per)  # of the partition that the cells make
        gain = (current - cost) / jnp.maximum(current, jnp.finfo(w.dtype).tiny)
        gain = jnp.where(r == 0, jnp.inf, gain)
        return new, gain, r + 1

    def keep_refining(carry):
        _, gain, r = carry
        return (r < MAX_ROUNDS) & (gain > ROUND_RTOL)

    lo, hi = jnp.min(w), jnp.max(w)
    uniform = lo + (hi - lo) * ((jnp.arange(k, dtype=w.dtype) + 0.5) / k)
    start = (uniform, jnp.asarray(jnp.inf, w.dtype), jnp.asarray(0, jnp.int32))
    centroids, _, _ = jax.lax.while_loop(keep_refining, refine, start)
    return _lloyd(w, centroids, k, max_iter, tol).astype(out_dtype)


def _segment_costs(x: jax.Array, m: jax.Array) -> jax.Array:
    """cost[i, j]: squared error of atoms i..j-1 (positions x, counts m) around their mean,
    for i < j (inf otherwise), by Welford's update over j for all i at once."""
    b = x.shape[0]
    start = jnp.arange(b + 1)
    tiny = jnp.finfo(x.dtype).tiny

    def add_atom(carry, a):
        count, mean, cost = carry
        added = jnp.where(start <= a, m[a], 0)
        total = count + added
        share = added / jnp.maximum(total, tiny)
        delta = x[a] - mean
        return (total, mean + share * delta, cost + share * count * delta * delta), cost

    zero = jnp.zeros((b + 1,), x.dtype)
    (_, _, last), cols = jax.lax.scan(add_atom, (zero, zero, zero), jnp.arange(b))
    cost = jnp.concatenate([cols, last[None]]).T  # cols[j] is column j: atoms i..j-1
    return jnp.where(start[:, None] < start[None, :], cost, jnp.inf)


def _optimal_runs(x: jax.Array, m: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k runs of consecutive atoms (means x, counts m; in the order of the intervals they
    cover) of least squared error: the runs' means, sorted (a run of empty atoms sits at the
    mean of their x), and the error between atoms (the error within atoms is the same for
    every partition)."""
    b = x.shape[0]
    cost = _segment_costs(x, m)
    dense = (k - 1) * (b + 1) ** 2 <= 2**25  # small: all (i, j) at once compiles faster

    def add_run(best, _):
        if dense:
            total = best[:, None] + cost
            return jnp.min(total, axis=0), jnp.argmin(total, axis=0).astype(jnp.int32)
        return _add_run(best, cost)

    best, choices = jax.lax.scan(add_run, cost[0], None, length=k - 1)
    _, inner = jax.lax.scan(
        lambda j, choice: (choice[j], choice[j]), jnp.asarray(b, jnp.int32), choices, reverse=True
    )
    run = jnp.sum(jnp.arange(b, dtype=jnp.int32)[:, None] >= inner[None, :], axis=1)
    ones = jnp.ones_like(x)
    count, total, middle, atoms = jax.ops.segment_sum(
        jnp.stack([m, m * x, x, ones], axis=1), run, num_segments=k
    ).T
    means = jnp.where(
        count > 0, total / jnp.maximum(count, jnp.finfo(x.dtype).tiny), middle / atoms
    )
    return jnp.sort(means), best[b]


def _add_run(prev: jax.Array, cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """best[j] = min_{i<j} prev[i] + cost[i, j] and its argmin, for all j.

    The argmin is monotone in j (the costs satisfy the quadrangle inequality), so the j are
    taken in the order of a balanced binary tree, level by level: each j searches only
    between the argmins of its neighbours on the levels above. Those ranges chain (one ends
    where the next begins), so one level's searches together fit one flat array of
    size + nodes slots, evaluated at once; node t's slots begin at its lower bound + t."""
    size = prev.shape[0]
    depth = max(1, math.ceil(math.log2(size + 1)))
    half = (size + 1) // 2  # the most nodes on a level
    length = size + half
    t = jnp.arange(half, dtype=jnp.int32)
    flat = jnp.arange(length, dtype=jnp.int32)

    def level(d, carry):
        best, arg = carry
        s = jnp.left_shift(1, depth - 1 - d).astype(jnp.int32)
        nodes = (size + s) // (2 * s)  # the j = (2t + 1) s - 1 inside [0, size)
        live = t < nodes
        j = (2 * t + 1) * s - 1
        lower = jnp.where(t > 0, arg[jnp.clip(j - s, 0, size - 1)], 0)
        first = jnp.where(live, lower + t, length)
        owner = jnp.cumsum(jnp.zeros((length,), jnp.int32).at[first].add(1, mode="drop")) - 1
        i = jnp.minimum(flat - owner, size - 1)
        jo = jnp.minimum(j[owner], size - 1)
        upper = jnp.where(jo + s < size, arg[jnp.minimum(jo + s, size - 1)], size - 1)
        ok = (owner < nodes) & (flat - owner <= upper)
        value = jnp.where(ok, prev[i] + cost[i, jo], jnp.inf)
        node = jnp.where(ok, owner, half)
        low = jax.ops.segment_min(value, node, num_segments=half + 1)[:half]
        hit = ok & (value <= low[owner])
        choice = jax.ops.segment_min(jnp.where(hit, i, size), node, num_segments=half + 1)
        choice = jnp.where(jnp.isfinite(low), choice[:half], lower)
        target = jnp.where(live, j, size)  # the others are dropped
        return best.at[target].set(low, mode="drop"), arg.at[target].set(choice, mode="drop")

    start = (jnp.full((size,), jnp.inf, prev.dtype), jnp.zeros((size,), jnp.int32))
    return jax.lax.fori_loop(0, depth, level, start)


def _run_costs(x: jax.Array, m: jax.Array, per: int) -> jax.Array:
    """The between-atom error of the runs of `per` consecutive atoms (the current cells)."""
    x, m = x.reshape(-1, per), m.reshape(-1, per)
    count = jnp.sum(m, axis=1, keepdims=True)
    mean = jnp.sum(m * x, axis=1, keepdims=True) / jnp.maximum(count, jnp.finfo(x.dtype).tiny)
    return jnp.sum(m * (x - mean) ** 2)


def _cell_atoms(w: jax.Array, centroids: jax.Array, per: int) -> tuple[jax.Array, jax.Array]:
    """Each Voronoi cell of the sorted centroids (clipped to [min w, max w]) cut into `per`
    atoms: (mean, count) of the weights in each, cell after cell.

    The cuts are equal steps across the cell, or, where the cell's mean |w - centroid| is
    under 1/16 of its width, equal steps of z / (1 + |z|), z = (w - centroid) / that mean:
    this resolves a cell whose weights gather in a small part of it (a far outlier makes
    the bulk's cell wide from a uniform start), so that the next round can give the bulk
    more clusters."""
    k = centroids.shape[0]
    tiny = jnp.finfo(w.dtype).tiny
    labels = assign(w, centroids)
    offset = w - centroids[labels]
    count, spread = _sums(jnp.abs(offset), labels, k)
    spread = spread / jnp.maximum(count, 1)
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    left = jnp.concatenate([jnp.min(w)[None], midpoints])
    right = jnp.concatenate([midpoints, jnp.max(w)[None]])
    span = jnp.maximum(right - left, tiny)
    spread = jnp.maximum(spread, span * 2.0**-20)  # an empty cell, or all its weights equal
    bend = spread < span / 16  # the weights gather in a small part of the cell

    def compand(v, spread):
        z = v / spread
        return z / (1 + jnp.abs(z))

    low = jnp.where(bend, compand(left - centroids, spread), left)
    high = jnp.where(bend, compand(right - centroids, spread), right)
    at = jnp.where(bend[labels], compand(offset, spread[labels]), w)
    sub = (at - low[labels]) * (per / jnp.maximum(high - low, tiny))[labels]
    atom = labels * per + jnp.clip(sub.astype(jnp.int32), 0, per - 1)
    m, sums = _sums(offset, atom, k * per)
    cell = jnp.arange(k * per) // per
    return centroids[cell] + sums / jnp.maximum(m, 1), m


def _companded_start(w: jax.Array, levels: jax.Array, bins: int = 4096) -> jax.Array:
    """Quantiles (at `levels`) of the density proportional to hist(w)^(1/3) (large K)."""
    lo, hi = jnp.min(w), jnp.max(w)
    width = jnp.maximum(hi - lo, jnp.finfo(w.dtype).tiny) / bins
    which = jnp.clip(((w - lo) / width).astype(jnp.int32), 0, bins - 1)
    density = jax.ops.segment_sum(jnp.ones_like(w), which, num_segments=bins) ** (1 / 3)
    cdf = jnp.concatenate([jnp.zeros((1,), w.dtype), jnp.cumsum(density)]) / jnp.sum(density)
    return jnp.interp(levels, cdf, lo + width * jnp.arange(bins + 1, dtype=w.dtype))
