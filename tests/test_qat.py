"""DKM and LSQ (qarjax.families.dkm, .lsq) against float64 references written from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qarjax.errors import ConfigError
from qarjax.families import dkm, lsq
from qarjax.kmeans import kmeans_1d, within_cluster_error

FQ = jax.jit(lsq.fake_quantize)  # K traced: one compilation per shape for every K
HQ = jax.jit(lsq.hard_quantize)
INDICES = jax.jit(lsq.indices)


@jax.jit
def fq_grads(w, s, k, u):
    """The gradients of sum(u * v^) with respect to the weights and the step (K traced)."""
    return jax.grad(lambda w, s: jnp.sum(u * lsq.fake_quantize(w, s, k)), argnums=(0, 1))(w, s)


def clustered(seed, k=4, n=400, spread=0.05):
    """n weights around k well separated centres (at least 0.3 apart), and the centres."""
    rng = np.random.default_rng(seed)
    centres = np.sort(rng.choice(np.linspace(-1, 1, 7), k, replace=False))
    w = centres[rng.integers(0, k, n)] + np.clip(rng.normal(0, spread, n), -0.1, 0.1)
    return w, centres


# ----------------------------------------------------------------------------- DKM


@pytest.mark.parametrize(
    "distance, taus", [("abs", [1, 0.1, 0.01, 1e-3]), ("squared", [1, 0.1, 0.01, 1e-4])]
)
def test_dkm_soft_reconstruction_tends_to_the_nearest_centroid(distance, taus):
    with jax.enable_x64(True):
        w, centres = clustered(0)
        c = jnp.asarray(centres + 0.02)
        hard = np.asarray(dkm.hard_quantize(jnp.asarray(w), c))
        np.testing.assert_array_equal(hard, (c[np.argmin(np.abs(w[:, None] - c), axis=1)]))
        errors = [
            np.max(np.abs(np.asarray(dkm.reconstruct(w, c, tau=t, distance=distance)) - hard))
            for t in taus
        ]
        assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
        assert errors[0] > 1e-2 and errors[-1] < 1e-12, errors
        a = dkm.attention(w, c, tau=taus[-1], distance=distance)
        np.testing.assert_array_equal(np.argmax(a, axis=1), dkm.assign(jnp.asarray(w), c))


def ref_attention(w, c, tau, distance):
    d = np.abs(w[:, None] - c) if distance == "abs" else (w[:, None] - c) ** 2
    e = np.exp(-(d - d.min(axis=1, keepdims=True)) / tau)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("distance, tau", [("abs", 0.05), ("squared", 0.01)])
def test_dkm_attention_and_step_match_a_float64_reference(distance, tau):
    w, centres = clustered(1, spread=0.2)
    c = centres + 0.05
    a = ref_attention(w, c, tau, distance)
    with jax.enable_x64(True):
        np.testing.assert_allclose(dkm.attention(w, c, tau=tau, distance=distance), a, rtol=1e-12)
        step = dkm.soft_kmeans_step(w, c, tau=tau, distance=distance)
    np.testing.assert_allclose(step, (a * w[:, None]).sum(0) / a.sum(0), rtol=1e-12)
    step32 = dkm.soft_kmeans_step(jnp.asarray(w, jnp.float32), c, tau=tau, distance=distance)
    np.testing.assert_allclose(step32, step, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance, tau", [("abs", 0.02), ("squared", 0.002)])
def test_dkm_soft_kmeans_step_does_not_increase_the_within_cluster_error(distance, tau):
    with jax.enable_x64(True):
        for seed in range(5):
            w, centres = clustered(seed)
            rng = np.random.default_rng(100 + seed)
            c0 = jnp.asarray(np.sort(centres + rng.normal(0, 0.05, centres.size)))
            c1 = dkm.soft_kmeans_step(w, c0, tau=tau, distance=distance)
            before = within_cluster_error(jnp.asarray(w), c0)
            after = within_cluster_error(jnp.asarray(w), jnp.sort(c1))
            assert after < before, (seed, float(before), float(after))
            c, taken = dkm.solve_centroids(w, c0, tau=tau, distance=distance, max_iter=20)
            assert 1 <= int(taken) < 20  # converged before the limit
            assert within_cluster_error(jnp.asarray(w), jnp.sort(c)) <= after + 1e-12


def test_dkm_padded_centroids_get_no_attention_and_change_nothing():
    with jax.enable_x64(True):
        w, centres = clustered(2, k=3, spread=0.2)
        c = jnp.asarray(centres + 0.03)
        # Padding right inside the data (would attract), far away, and NaN.
        padded = jnp.concatenate([c, jnp.asarray([float(np.median(w)), 5.0, np.nan])])
        mask = dkm.centroid_mask(3, 6)
        np.testing.assert_array_equal(mask, [True] * 3 + [False] * 3)
        kw = dict(tau=0.05, max_iter=4, eps=0.0)
        a = dkm.attention(w, padded, mask, tau=0.05)
        assert np.all(np.asarray(a[:, 3:]) == 0)
        np.testing.assert_allclose(a[:, :3], dkm.attention(w, c, tau=0.05), rtol=1e-13)

        @jax.jit
        def run(w, cents, mask):
            def loss(w):
                out, new, taken = dkm.soft_quantize(w, cents, mask, **kw)
                return jnp.sum(jnp.sin(7 * out)), (out, new, taken)

            return jax.grad(loss, has_aux=True)(w)

        g_pad, (out, cp, taken) = run(jnp.asarray(w), padded, mask)
        g_ref, (ref, cr, _) = run(jnp.asarray(w), c, None)
        np.testing.assert_allclose(out, ref, rtol=1e-13)
        np.testing.assert_allclose(cp[:3], cr, rtol=1e-13)
        np.testing.assert_array_equal(cp[3:5], padded[3:5])  # padded entries never move
        assert int(taken) == 4
        np.testing.assert_array_equal(dkm.assign(w, padded, mask), dkm.assign(w, c))
        assert np.all(np.isfinite(g_pad))
        np.testing.assert_allclose(g_pad, g_ref, rtol=1e-10, atol=1e-13)


def test_dkm_gradient_is_finite_nonzero_flows_through_the_steps_and_matches_differences():
    w = jnp.asarray(np.random.default_rng(3).normal(0, 0.05, (8, 25)), jnp.float32)
    c = jnp.asarray([-0.06, -0.02, 0.02, 0.06, 0.06, 0.06], jnp.float32)
    mask = dkm.centroid_mask(4, 6)
    u = jnp.asarray(np.random.default_rng(4).normal(size=w.shape), jnp.float32)

    def loss(w, c, remat=True):
        cents, _ = dkm.solve_centroids(w, c, mask, tau=0.01, max_iter=3, eps=0.0, remat=remat)
        return jnp.sum(u.astype(w.dtype) * dkm.reconstruct(w, cents, mask, tau=0.01))

    g, g_plain = jax.jit(lambda w: [jax.grad(loss)(w, c), jax.grad(loss)(w, c, False)])(w)
    assert g.shape == w.shape and np.all(np.isfinite(g))
    assert np.mean(np.asarray(g) != 0) > 0.9
    np.testing.assert_allclose(g, g_plain, rtol=1e-5, atol=1e-7)
    # Central differences see the centroids move with the weights: they match only if the
    # gradient flows through the soft k-means steps.
    with jax.enable_x64(True):  # directional derivatives against central differences
        w64, c64 = jnp.asarray(w, jnp.float64), jnp.asarray(c, jnp.float64)
        f = jax.jit(jax.value_and_grad(lambda w: loss(w, c64)))
        g64 = f(w64)[1]
        rng = np.random.default_rng(7)
        for _ in range(2):
            v = rng.normal(size=w.shape)
            h = 1e-6
            numeric = (f(w64 + h * v)[0] - f(w64 - h * v)[0]) / (2 * h)
            np.testing.assert_allclose(np.sum(g64 * v), numeric, rtol=1e-6)


def test_dkm_a_dead_centroid_stays_put_and_keeps_gradients_finite():
    @jax.jit
    def grad_and_centroids(w, c):
        def loss(w):
            out, new, _ = dkm.soft_quantize(w, c, tau=0.01, eps=0.0)
            return jnp.sum(out**2), new

        return jax.grad(loss, has_aux=True)(w)

    w = jnp.asarray(np.random.default_rng(8).normal(0, 0.05, 1000), jnp.float32)
    for far in (0.9, 3.0):  # attention mass about 1e-28 (NaN gradients before), and 0
        g, new = grad_and_centroids(w, jnp.asarray([-0.05, 0.0, 0.05, far], jnp.float32))
        assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0
        assert float(new[3]) == np.float32(far)


def test_dkm_compiles_once_for_every_k_under_the_same_k_max():
    traces = []

    @jax.jit
    def step(w, cents, k):
        traces.append(1)
        mask = dkm.centroid_mask(k, 8)
        out, new, _ = dkm.soft_quantize(w, cents, mask, tau=0.01)
        return jnp.sum(out**2), dkm.assign(w, new, mask)

    w = jnp.asarray(np.random.default_rng(5).normal(0, 0.05, 300), jnp.float32)
    for k in (2, 3, 8):
        cents = jnp.quantile(w, (jnp.arange(8) + 0.5) / k)  # the first k: k quantiles
        _, idx = step(w, cents, k)
        assert int(jnp.max(idx)) < k and np.unique(np.asarray(idx)).size == k
    assert len(traces) == 1


def test_dkm_init_centroids_and_bad_arguments():
    w = jnp.asarray(np.random.default_rng(6).normal(0, 0.05, 500), jnp.float32)
    c, mask = dkm.init_centroids(w, 3, 5)
    np.testing.assert_array_equal(c[:3], kmeans_1d(w, 3))
    np.testing.assert_array_equal(c[3:], [c[2], c[2]])
    np.testing.assert_array_equal(mask, [True, True, True, False, False])
    with pytest.raises(ConfigError, match="K <= k_max"):
        dkm.init_centroids(w, 6, 5)
    with pytest.raises(ConfigError, match="distance"):
        dkm.attention(w, c, tau=0.1, distance="cosine")
    with pytest.raises(ConfigError, match="max_iter"):
        dkm.solve_centroids(w, c, tau=0.1, max_iter=0)


# ----------------------------------------------------------------------------- LSQ

KS = [2, 3, 4, 5, 8, 16]


def paper_levels(k):
    """The paper's signed Q_N, Q_P for K = 2^b (b >= 2); odd K symmetric; K = 2 our variant."""
    b = int(np.log2(k))
    if k >= 4 and 2**b == k:
        return 2 ** (b - 1), 2 ** (b - 1) - 1, 0.0
    if k == 2:
        return 1, 0, 0.5
    return (k - 1) // 2, (k - 1) // 2, 0.0


def ref_step_gradient(w, s, k, u):
    """d/ds sum(u * v^): the paper's eq. 3 times g = 1/sqrt(N Q_P) (offset o: K = 2 only)."""
    q_n, q_p, o = paper_levels(k)
    x = w / s - o
    inside = (-q_n < x) & (x < q_p)
    d = np.where(inside, np.round(x) + o - w / s, np.where(x <= -q_n, -q_n + o, q_p + o))
    return np.sum(u * d) / np.sqrt(w.size * (q_p + o))


@pytest.mark.parametrize("k", KS)
def test_lsq_forward_has_k_levels_on_the_grid(k):
    w = jnp.asarray(np.random.default_rng(k).normal(0, 0.05, (20, 30)), jnp.float32)
    s = lsq.init_step(w, k) * 0.6  # some weights clip
    out = FQ(w, s, k)
    values = np.unique(np.asarray(out))
    grid = np.asarray(lsq.grid(s, k))
    assert values.size <= k and set(values) <= set(grid)
    assert values.size == k  # the clipped init reaches every level
    np.testing.assert_array_equal(out, HQ(w, s, k))
    idx = INDICES(w, s, k)
    assert idx.dtype == jnp.int32 and 0 <= int(idx.min()) and int(idx.max()) < k
    np.testing.assert_array_equal(grid[np.asarray(idx)], out)
    q_n, q_p, o = paper_levels(k)
    np.testing.assert_allclose(grid, (np.arange(-q_n, q_p + 1) + o) * float(s), rtol=1e-6)


def test_lsq_grids_of_small_k_and_padding():
    np.testing.assert_array_equal(lsq.grid(2.0, 2), [-1.0, 1.0])
    np.testing.assert_array_equal(lsq.grid(1.0, 3), [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(lsq.grid(1.0, 4), [-2.0, -1.0, 0.0, 1.0])
    np.testing.assert_array_equal(lsq.grid(0.5, 4, 6), [-1.0, -0.5, 0.0, 0.5, np.inf, np.inf])
    with pytest.raises(ConfigError, match="K >= 2"):
        lsq.levels(1)


@pytest.mark.parametrize("k", KS)
def test_lsq_weight_gradient_is_straight_through_inside_and_zero_outside(k):
    w = np.random.default_rng(10 + k).normal(0, 0.05, 300).astype(np.float32)
    s = np.float32(lsq.init_step(jnp.asarray(w), k) * 0.6)
    g, _ = fq_grads(w, s, k, np.ones_like(w))
    q_n, q_p, o = paper_levels(k)
    x = w.astype(np.float64) / s - o
    inside = (-q_n < x) & (x < q_p)
    assert 0 < inside.sum() < w.size
    # 1 up to rounding: XLA may turn the division by s into a product with 1/s.
    np.testing.assert_allclose(g, inside.astype(np.float32), rtol=2e-7, atol=0)


@pytest.mark.parametrize("k", KS)
def test_lsq_step_gradient_matches_the_paper_in_float64(k):
    rng = np.random.default_rng(20 + k)
    w, u = rng.normal(0, 0.05, 300), rng.normal(size=300)
    with jax.enable_x64(True):
        s = float(lsq.init_step(jnp.asarray(w), k)) * 0.8
        _, got = fq_grads(w, s, k, u)
    np.testing.assert_allclose(got, ref_step_gradient(w, s, k, u), rtol=1e-12)


def test_lsq_clip_boundaries_count_as_outside():
    s, k = np.float32(0.25), 4  # levels -0.5 .. 0.25: Q_N = 2, Q_P = 1
    w = np.zeros(300, np.float32)
    w[:2] = [-0.5, 0.25]  # exactly on the ends of the clip range; the rest inside (at 0)
    u = np.zeros_like(w)
    u[:2] = 1
    gw, gs = fq_grads(w, s, k, u)
    np.testing.assert_array_equal(gw[:2], [0.0, 0.0])
    np.testing.assert_allclose(gs, (-2 + 1) / np.sqrt(300 * 1), rtol=1e-6)


@pytest.mark.parametrize("k", KS)
def test_lsq_init_step(k):
    w = np.random.default_rng(30 + k).normal(0, 0.05, 400)
    q_p = paper_levels(k)[1]
    want = 2 * np.mean(np.abs(w)) / (np.sqrt(q_p) if q_p else 1.0)
    with jax.enable_x64(True):
        np.testing.assert_allclose(lsq.init_step(jnp.asarray(w), k), want, rtol=1e-12)
        np.testing.assert_allclose(jax.jit(lsq.init_step)(w, k), want, rtol=1e-12)


def test_lsq_compiles_once_for_every_k():
    traces = []

    @jax.jit
    def step(w, s, k):
        traces.append(1)
        return jax.value_and_grad(lambda s: jnp.sum(lsq.fake_quantize(w, s, k) ** 2))(s)

    w = np.random.default_rng(40).normal(0, 0.05, 300).astype(np.float32)
    for k in (2, 3, 8):
        s = np.float32(lsq.init_step(w, k))
        value, grad = step(w, s, k)
        np.testing.assert_allclose(value, np.sum(np.asarray(FQ(w, s, k)) ** 2), rtol=1e-6)
        want = ref_step_gradient(w.astype(np.float64), float(s), k, 2 * np.asarray(FQ(w, s, k)))
        np.testing.assert_allclose(grad, want, rtol=1e-4)
    assert len(traces) == 1
