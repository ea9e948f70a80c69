"""The regularizer functions against float64 references written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qarjax import regularizers as R
from qarjax.families.dynamic import UNROLL_MAX

# ----------------------------------------------------------------------------- float64 refs


def ref_sine(w, k, lo, hi):
    h = (hi - lo) / (k - 1)
    c = np.clip(w, lo, hi)
    return (h / np.pi) ** 2 * np.sin(np.pi * (c - lo) / h) ** 2 + (w - c) ** 2


def ref_cosine(w, k, lo, hi):
    h = (hi - lo) / k
    inside = (h / np.pi) ** 2 * np.cos(np.pi * (w - lo) / h) ** 2
    first, last = lo + h / 2, hi - h / 2
    return np.where(w < lo, (w - first) ** 2, np.where(w > hi, (w - last) ** 2, inside))


def ref_nearest(w, c):
    return np.min((w[:, None] - c[None, :]) ** 2, axis=1)


def ref_softmin(w, c, tau):
    d = -((w[:, None] - c[None, :]) ** 2) / tau
    m = d.max(axis=1, keepdims=True)
    return -tau * (m[:, 0] + np.log(np.mean(np.exp(d - m), axis=1)))


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        g.flat[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


RNG = np.random.default_rng(0)
W = RNG.normal(0, 0.05, 40)  # includes values outside [lo, hi] below
LO, HI = -0.06, 0.07
REPS = np.array([-0.05, -0.01, 0.02, 0.06])


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("k", [2, 3, 4, 16])
def test_sine_and_cosine_values(k):
    w32 = jnp.asarray(W, jnp.float32)
    for fn, ref in ((R.sine, ref_sine), (R.cosine, ref_cosine)):
        got = fn(w32, k=k, lo=LO, hi=HI, reduction="none")
        np.testing.assert_allclose(got, ref(W, k, LO, HI), rtol=2e-4, atol=1e-9)
        assert float(fn(w32, k=k, lo=LO, hi=HI)) == pytest.approx(ref(W, k, LO, HI).sum(), 2e-4)
        mean = float(fn(w32, k=k, lo=LO, hi=HI, reduction="mean"))
        assert mean == pytest.approx(ref(W, k, LO, HI).mean(), rel=2e-4)


@pytest.mark.parametrize("k", [2, 16, 255])
def test_sine_and_cosine_are_exact_to_float32_on_a_dense_grid(k):
    """The terms use a polynomial for sin^2 (XLA:CPU's sin is slow): checked against float64
    everywhere in and around the range, values and gradients, to float32 resolution."""
    w = np.linspace(LO - 0.02, HI + 0.02, 20_001)
    w32 = jnp.asarray(w, jnp.float32)
    w = np.asarray(w32, np.float64)  # the same points, so only the arithmetic differs
    for fn, ref, h in (
        (R.sine, ref_sine, (HI - LO) / (k - 1)),
        (R.cosine, ref_cosine, (HI - LO) / k),
    ):
        scale = (h / np.pi) ** 2
        got = np.asarray(fn(w32, k=k, lo=LO, hi=HI, reduction="none"), np.float64)
        # float32 resolves u = (w - lo) / h <= K to K 2^-23: sin^2(pi u) to 2 pi K 2^-23
        atol = 4 * np.pi * k * 2.0**-23 * scale
        np.testing.assert_allclose(got, ref(w, k, LO, HI), rtol=1e-6, atol=atol)
        grad = np.asarray(jax.grad(lambda x, fn=fn: fn(x, k=k, lo=LO, hi=HI))(w32), np.float64)
        step = 1e-9
        want = (ref(w + step, k, LO, HI) - ref(w - step, k, LO, HI)) / (2 * step)
        inside = (w > LO + 1e-4) & (w < HI - 1e-4)  # the cosine's walls at the range ends
        np.testing.assert_allclose(grad[inside], want[inside], rtol=0, atol=3e-4 * h)


def test_dynamic_values():
    w32, c32 = jnp.asarray(W, jnp.float32), jnp.asarray(REPS, jnp.float32)
    got = R.nearest(w32, c32, reduction="none")
    np.testing.assert_allclose(got, ref_nearest(W, REPS), rtol=1e-4, atol=1e-10)
    tau = 2e-4
    got = R.softmin(w32, c32, temperature=tau, reduction="none")
    np.testing.assert_allclose(got, ref_softmin(W, REPS, tau), rtol=1e-3, atol=1e-9)


def test_range_baselines():
    w = jnp.asarray(W, jnp.float32)
    assert float(R.linf(w)) == pytest.approx(np.abs(W).max(), rel=1e-6)
    m = 0.05
    ref = np.mean(np.maximum(np.abs(W) - m, 0) ** 2) + m**2
    assert float(R.margin(w, jnp.float32(m))) == pytest.approx(ref, rel=1e-5)
    # For a large temperature, soft max - soft min approaches max - min.
    smm = float(R.soft_min_max(w, jnp.float32(5000.0), eta=0.0))
    assert smm == pytest.approx(W.max() - W.min(), rel=0.02)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", ["sine", "cosine"])
def test_static_gradients_match_finite_differences(family):
    fn, ref = (R.sine, ref_sine) if family == "sine" else (R.cosine, ref_cosine)
    w = W[np.abs(np.abs(W - LO)) > 1e-3]  # away from the cosine's wall at the range ends
    w = w[np.abs(w - HI) > 1e-3]
    got = jax.grad(lambda x: fn(x, k=4, lo=LO, hi=HI))(jnp.asarray(w, jnp.float32))
    want = numeric_grad(lambda x: ref(x, 4, LO, HI).sum(), w)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)


def test_dynamic_gradients_match_finite_differences():
    w32, c32 = jnp.asarray(W, jnp.float32), jnp.asarray(REPS, jnp.float32)
    gw, gc = jax.grad(lambda w, c: R.nearest(w, c), argnums=(0, 1))(w32, c32)
    np.testing.assert_allclose(gw, numeric_grad(lambda x: ref_nearest(x, REPS).sum(), W), 2e-3)
    np.testing.assert_allclose(gc, numeric_grad(lambda c: ref_nearest(W, c).sum(), REPS), 2e-3)
    tau = 2e-4
    gw, gc = jax.grad(lambda w, c: R.softmin(w, c, temperature=tau), argnums=(0, 1))(w32, c32)
    want_w = numeric_grad(lambda x: ref_softmin(x, REPS, tau).sum(), W)
    want_c = numeric_grad(lambda c: ref_softmin(W, c, tau).sum(), REPS)
    np.testing.assert_allclose(gw, want_w, rtol=5e-3, atol=1e-6)
    np.testing.assert_allclose(gc, want_c, rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("size", [4, 8, UNROLL_MAX + 8])  # unrolled; padded; vectorized
def test_softmin_forms_match_the_reference_with_padded_representatives(size):
    w32 = jnp.asarray(W, jnp.float32)
    padded = np.concatenate([REPS, np.full(size - len(REPS), REPS[-1])])
    c32, mask = jnp.asarray(padded, jnp.float32), jnp.arange(size) < len(REPS)
    tau = 2e-4
    got = R.softmin(w32, c32, temperature=tau, mask=mask, reduction="none")
    np.testing.assert_allclose(got, ref_softmin(W, REPS, tau), rtol=1e-3, atol=1e-9)
    grad = jax.grad(lambda w, c: R.softmin(w, c, temperature=tau, mask=mask), argnums=(0, 1))
    gw, gc = grad(w32, c32)
    want_w = numeric_grad(lambda x: ref_softmin(x, REPS, tau).sum(), W)
    want_c = numeric_grad(lambda c: ref_softmin(W, c, tau).sum(), REPS)
    np.testing.assert_allclose(gw, want_w, rtol=5e-3, atol=1e-6)
    np.testing.assert_allclose(gc[: len(REPS)], want_c, rtol=5e-3, atol=1e-6)
    assert np.all(np.asarray(gc[len(REPS) :]) == 0)  # the padding gets no gradient, no NaN


def test_nearest_pulls_reps_to_their_cluster_means():
    w = jnp.array([0.0, 0.2, 1.0, 1.4])
    c = jnp.array([0.5, 1.0])
    grad = jax.grad(lambda c: R.nearest(w, c))(c)
    # d/dc_k sum (w - c_k)^2 over its cluster = 2 * n_k * (c_k - mean_k)
    np.testing.assert_allclose(grad, [2 * 2 * (0.5 - 0.1), 2 * 2 * (1.0 - 1.2)], rtol=1e-6)


# ----------------------------------------------------------------------------- minima


def _local_minima(values):
    v = np.asarray(values)
    inner = (v[1:-1] <= v[:-2]) & (v[1:-1] <= v[2:])
    return np.flatnonzero(inner) + 1


@pytest.mark.parametrize("family", ["sine", "cosine"])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_static_minima_are_exactly_the_grid(family, k):
    lo, hi = -1.0, 1.5
    fn = R.sine if family == "sine" else R.cosine
    grid = np.asarray((R.sine_grid if family == "sine" else R.cosine_grid)(k, lo, hi))
    h = grid[1] - grid[0]
    xs = np.linspace(lo - 3 * h, hi + 3 * h, 20001)
    rho = np.asarray(fn(jnp.asarray(xs), k=k, lo=lo, hi=hi, reduction="none"))
    found = xs[_local_minima(rho)]
    assert len(found) == k
    np.testing.assert_allclose(found, grid, atol=2 * (xs[1] - xs[0]))
    assert np.all(rho >= 0)
    # Near each zero the term is a squared distance (unit curvature).
    near = np.asarray(fn(jnp.asarray(grid + 1e-3), k=k, lo=lo, hi=hi, reduction="none"))
    np.testing.assert_allclose(near, 1e-6, rtol=2e-2)


def test_grids():
    np.testing.assert_allclose(R.sine_grid(3, 0.0, 1.0), [0, 0.5, 1])
    np.testing.assert_allclose(R.cosine_grid(4, 0.0, 1.0), [0.125, 0.375, 0.625, 0.875])


# ----------------------------------------------------------------------------- properties

floats = st.floats(-2.0, 2.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=20), st.integers(2, 9))
def test_static_terms_are_non_negative(ws, k):
    w = jnp.asarray(ws, jnp.float32)
    for fn in (R.sine, R.cosine):
        assert np.all(np.asarray(fn(w, k=k, lo=-1.0, hi=1.0, reduction="none")) >= 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(floats, min_size=1, max_size=20),
    st.lists(floats, min_size=2, max_size=8),
    st.floats(1e-4, 1.0),
)
def test_softmin_is_bounded_by_nearest_and_converges_to_it(ws, cs, tau):
    w, c = jnp.asarray(ws, jnp.float32), jnp.asarray(cs, jnp.float32)  # bounds hold in float32
    near = np.asarray(R.nearest(w, c, reduction="none"), np.float64)
    soft = np.asarray(R.softmin(w, c, temperature=tau, reduction="none"), np.float64)
    slack = 1e-5 * (1 + near + tau)
    assert np.all(near >= 0)
    assert np.all(soft >= near - slack)
    assert np.all(soft <= near + tau * np.log(len(cs)) + slack)
    cold = np.asarray(R.softmin(w, c, temperature=1e-7, reduction="none"), np.float64)
    np.testing.assert_allclose(cold, near, atol=1e-6 * np.log(len(cs)) + 1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=20), st.permutations(list(range(5))))
def test_nearest_ignores_the_order_of_the_representatives(ws, order):
    w = jnp.asarray(ws, jnp.float32)
    c = jnp.asarray([-1.0, -0.3, 0.1, 0.4, 1.2], jnp.float32)
    a = R.nearest(w, c, reduction="none")
    b = R.nearest(w, c[jnp.asarray(order)], reduction="none")
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- gradient L1


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def test_gradient_l1_is_the_l1_norm_of_the_gradient_and_differentiable():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (5, 8)) * 0.5,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k2, (8, 3)) * 0.5,
    }
    x, y = jax.random.normal(k3, (16, 5)), jnp.arange(16) % 3
    loss = lambda p: _mlp_loss(p, x, y)
    kernels = lambda g: {"w1": g["w1"], "w2": g["w2"]}
    direct = sum(float(jnp.abs(v).sum()) for v in kernels(jax.grad(loss)(params)).values())
    assert float(R.gradient_l1(loss, params, select=kernels)) == pytest.approx(direct, rel=1e-6)
    # Double backprop: its own gradient matches central differences.
    reg = lambda w1: R.gradient_l1(loss, {**params, "w1": w1}, select=kernels)
    g = jax.grad(reg)(params["w1"])
    eps = 1e-3
    e = jnp.zeros_like(params["w1"]).at[1, 2].set(eps)
    fd = (reg(params["w1"] + e) - reg(params["w1"] - e)) / (2 * eps)
    assert float(g[1, 2]) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)


def _conv_bn_loss(params, scale, x, y):
    """A conv -> batch norm (batch statistics) -> ReLU -> dense classifier, its logits scaled
    by `scale`: a loss with a closed-over parameter and integer labels."""
    h = jax.lax.conv_general_dilated(
        x, params["conv"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = (h - h.mean((0, 1, 2))) * jax.lax.rsqrt(h.var((0, 1, 2)) + 1e-5) * params["gamma"]
    logits = scale * (jax.nn.relu(h).mean((1, 2)) @ params["dense"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_l1s_hessian_vector_gradient_is_double_backprops_in_float64(dtype):
    """The forward-over-reverse VJP against reverse-over-reverse in float64, through batch
    norm, a strided convolution and a closed-over parameter that is differentiated too."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(1), 4)
        p64 = {
            "conv": jax.random.normal(keys[0], (3, 3, 3, 4), jnp.float64) * 0.5,
            "gamma": 1.0 + 0.1 * jax.random.normal(keys[1], (4,), jnp.float64),
            "dense": jax.random.normal(keys[2], (4, 5), jnp.float64) * 0.5,
        }
        x = jax.random.normal(keys[3], (8, 6, 6, 3), jnp.float64)
        y = jnp.arange(8) % 5
        kernels = lambda t: {"conv": t["conv"], "dense": t["dense"]}

        def reference(p, scale):  # jax.grad of a function that calls jax.grad
            g = jax.grad(_conv_bn_loss)(p, scale, x, y)
            return sum(jnp.abs(v).sum() for v in kernels(g).values())

        want = jax.jit(jax.grad(reference, argnums=(0, 1)))(p64, 1.5)
        cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
        p, xs = cast(p64), x.astype(dtype)

        def penalty(p, scale):  # the scale only reaches the loss through its closure
            return R.gradient_l1(lambda q: _conv_bn_loss(q, scale, xs, y), p, select=kernels)

        value, got = jax.jit(jax.value_and_grad(penalty, argnums=(0, 1)))(
            p, jnp.asarray(1.5, dtype)
        )
        tol = 1e-12 if dtype == "float64" else 2e-5
        np.testing.assert_allclose(value, reference(p64, 1.5), rtol=tol)
        for name in p64:
            scale = float(jnp.max(jnp.abs(want[0][name])))
            np.testing.assert_allclose(got[0][name], want[0][name], rtol=tol, atol=tol * scale)
        np.testing.assert_allclose(got[1], want[1], rtol=10 * tol)


@pytest.mark.parametrize("family", ["sine", "cosine", "nearest", "softmin"])
@pytest.mark.parametrize("value", [0.5, -3.0, 0.0])
def test_a_constant_layer_has_a_finite_penalty_and_gradient(family, value):
    """A constant kernel gets a tiny range: one that float32 can hold away from zero (lo +
    1e-12 rounds back to lo there, and a zero-width range made 0/0)."""
    from flax import nnx

    import qarjax as qj

    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    model.kernel[...] = jnp.full((8, 4), value)
    reg = qj.attach(model, [qj.Rule("kernel", family, k=4, lam=1.0)])
    value, grads = nnx.value_and_grad(lambda m: reg.penalty(m))(model)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_live_counts_a_merged_group_whose_first_value_has_no_weights():
    """Representatives closer than 1% of the spacing count once, as live if any of them has
    weights: here a dead one sits just below a live one."""
    from flax import nnx

    import qarjax as qj
    from qarjax.trees import as_tree

    model = nnx.Linear(4, 2, use_bias=False, rngs=nnx.Rngs(0))
    model.kernel[...] = jnp.array([[0.0009, 0.001], [0.001, 1.0], [1.0, 1.0], [0.001, 0.0009]])
    reg = qj.attach(model, [qj.Rule("kernel", "nearest", k=3)])
    model.kernel_reps[...] = jnp.array([0.0, 0.001, 1.0])
    tree = as_tree(model)
    assert int(reg.metrics(tree, tree, tree)["kernel"]["live"]) == 2


def test_gradient_l1_before_its_start_step_is_zero_and_after_it_the_full_term():
    """Before the start the term is zero (on accelerators lax.cond skips the Hessian-vector
    product; on the CPU it is masked), and its gradient with it; from the start step on it
    is the term at full strength."""
    from flax import nnx

    import qarjax as qj

    model = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    x, y = jnp.linspace(-1, 1, 24).reshape(4, 6), jnp.array([0, 1, 2, 1])
    reg = qj.attach(model, [qj.Rule("kernel", "gradient_l1", k=4, lam=0.5)], start_step=5)

    def ce(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def value_and_grad(m, step, x, y):  # the loss closes over traced images and int labels
        def ce_traced(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        return nnx.value_and_grad(lambda m: reg.penalty(m, step=step, loss=ce_traced))(m)

    before, grads = value_and_grad(model, jnp.int32(4), x, y)
    assert float(before) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    after, grads = value_and_grad(model, jnp.int32(5), x, y)
    full, expected = nnx.value_and_grad(lambda m: reg.penalty(m, loss=ce))(model)
    np.testing.assert_allclose(float(after), float(full), rtol=1e-6)
    assert float(after) > 0
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-7)


def test_gradient_l1_compiles_no_convolution_inside_a_conditional_on_the_cpu():
    """XLA:CPU runs a convolution inside a conditional's branch as plain loops, not its
    convolution kernels (ResNet-20's gradient-L1 step 75 s instead of 1.4 s): on the CPU the
    term before its start step is masked, not skipped by lax.cond as on accelerators."""
    import re

    from flax import nnx

    import qarjax as qj

    model = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    x, y = jnp.ones((2, 8, 8, 3)), jnp.array([0, 3])
    reg = qj.attach(model, [qj.Rule("kernel", "gradient_l1", k=4, lam=0.5)], start_step=5)

    def grads(m, step, x, y):
        ce = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x).mean((1, 2)), y).mean()
        return nnx.grad(lambda m: reg.penalty(m, step=step, loss=ce))(m)

    hlo = nnx.jit(grads).lower(model, jnp.int32(4), x, y).compile().as_text()
    called = r"(?:branch_computations=\{([^}]*)\}|(?:true|false)_computation=(%[\w.\-]+))"
    bodies, branches, name = {}, [], None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            bodies[name] = []
        elif name:
            bodies[name].append(line)
        for groups in re.findall(called, line):  # a conditional's branches
            branches += [b.strip().lstrip("%") for g in groups for b in g.split(",") if b]
    assert any("convolution(" in line for body in bodies.values() for line in body)
    assert branches or " conditional(" not in hlo
    assert not [b for b in branches if any("convolution(" in line for line in bodies.get(b, []))]
    # the accelerators' path (lax.cond skips the product before the start) lowers for them
    graphdef, state = nnx.split(model)
    pure = lambda state, *args: grads(nnx.merge(graphdef, state), *args)
    exported = jax.export.export(jax.jit(pure), platforms=("cuda", "tpu"))
    assert exported(state, jnp.int32(4), x, y).platforms == ("cuda", "tpu")
