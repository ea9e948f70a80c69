"""The contract every registered family keeps (qarjax.families), tested over all of them.

For each family on a small two-layer model: its variables are the ones it declares, its term
R >= 0 (and finite), its grid is sorted and padded with +inf beyond K to the run's size, one
compiled step serves every K, the quantized layers have <= K values (its own grid's where it
has one), and the compressed model survives a save / load round trip. A family registered by
a test goes through the same stages: adding one touches one module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qarjax as qj
from qarjax.families import FAMILIES, Family, family, register
from qarjax.quantize import QUANTIZERS
from qarjax.trees import as_tree, get_in

LABELS = {"reps", "scalars", "weights"}
ATTACHED = [n for n in FAMILIES if n != "none"]  # a rule of family "none" selects nothing
K_MAX = 4


def _model():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(nnx.Linear(6, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs))


def _loss_of_params(params):  # for gradient_l1: any differentiable function of the params
    return sum(jnp.sum(jnp.sin(leaf) ** 2) for leaf in jax.tree.leaves(params))


def _attach(name, k=K_MAX):
    model = _model()
    reg = qj.attach(model, qj.Rule(r".*kernel", family=name, k=k), k_max=K_MAX)
    return model, reg


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_declares_its_variables_and_labels(name):
    fam = family(name)
    assert set(fam.variables(K_MAX)) == set(fam.suffixes)
    assert set(fam.labels()) <= set(fam.suffixes) and set(fam.labels().values()) <= LABELS
    assert set(fam.carries) <= set(fam.suffixes) - set(fam.labels())
    assert fam.k_free == ("k" not in fam.suffixes)
    assert fam.quantizer in QUANTIZERS
    assert fam.step_factor >= 1.0 and (fam.baseline_lambda is None or fam.baseline_lambda > 0)


@pytest.mark.parametrize("name", ATTACHED)
def test_a_familys_term_is_finite_and_nonnegative(name):
    model, reg = _attach(name)
    tree = as_tree(model)
    for scale in (1.0, 10.0):  # on the started weights, and on weights far off the grid
        params = jax.tree.map(lambda x, s=scale: x * s, as_tree(model, nnx.Param))
        total, values = reg.terms(params, tree, tree, ce_of_params=_loss_of_params)
        assert np.isfinite(float(total)) and float(total) >= 0
        assert all(float(v) >= 0 for v in values.values())


@pytest.mark.parametrize("name", [n for n in FAMILIES if family(n).has_grid])
def test_a_familys_grid_is_sorted_and_padded_beyond_k(name):
    model, reg = _attach(name)
    for k in (2, 3, K_MAX):
        reg.start(model, ks={s.name: k for s in reg.layers})
        tree = as_tree(model)
        for layer in reg.layers:
            grid = np.asarray(reg.grid(layer, tree, tree, tree))
            assert grid.shape == (reg.padded_k(layer.name),)
            assert np.all(np.isfinite(grid[:k])) and np.all(np.diff(grid[:k]) >= 0)
            assert np.all(np.isposinf(grid[k:]))
            assert len(reg.grid_values(layer, tree, tree, tree)) == k


@pytest.mark.parametrize("name", ATTACHED)
def test_one_compiled_step_serves_every_k(name):
    model, reg = _attach(name)
    traces = []

    @jax.jit
    def step(tree, images, labels):
        traces.append(1)

        def loss(p):  # closes over traced images and integer labels, as a train step's does
            return _loss_of_params(p) + jnp.mean(images) * jnp.sum(labels)

        def penalty(params):  # differentiated, as in a train step
            return reg.terms(params, tree, consts, step=jnp.int32(0), ce_of_params=loss)[0]

        params, consts = reg.forward(tree, tree, tree)
        total = jax.value_and_grad(penalty, allow_int=True)(params)
        grids = [reg.grid(s, tree, tree, tree) for s in reg.layers if s.impl.has_grid]
        return total, grids

    for k in (2, 3, K_MAX):
        reg.start(model, ks={s.name: k for s in reg.layers})
        jax.block_until_ready(step(as_tree(model), jnp.ones((2, 6)), jnp.arange(2)))
    assert len(traces) == 1


@pytest.mark.parametrize("name", ATTACHED)
def test_a_familys_quantized_model_has_at_most_k_values_and_round_trips(name, tmp_path):
    model, reg = _attach(name, k=3)
    q = qj.quantize(model, reg)
    tree = as_tree(model)
    for layer in reg.layers:
        w = np.asarray(get_in(q.params, layer.path))
        assert np.unique(w).size <= 3 and q.layers[layer.name].k == 3
        if layer.impl.has_grid:  # quantized to its own grid
            np.testing.assert_allclose(
                np.sort(q.layers[layer.name].codebook),
                np.sort(reg.grid_values(layer, tree, tree, tree)),
                rtol=1e-6,
            )
    assert {m["method"] for m in q.metadata["layers"].values()} == {family(name).quantizer}
    qj.save(tmp_path / "m.qj", q)
    back = qj.load(tmp_path / "m.qj", into=_model())
    for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(back.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.metadata["layers"] == q.metadata["layers"]


@pytest.fixture
def l1_family():
    @register
    class L1(Family):  # a new family: one class, nothing else touched
        name = "test_l1"
        baseline_lambda = 1e-3

        def value(self, w, v, s):
            return jnp.sum(jnp.abs(w))

    yield L1
    del FAMILIES["test_l1"]


def test_a_family_registered_by_a_test_goes_through_every_stage(l1_family, tmp_path):
    model, reg = _attach("test_l1", k=2)
    tree = as_tree(model)
    want = sum(s.lam * np.abs(np.asarray(get_in(tree, s.path))).sum() for s in reg.layers)
    assert float(reg.penalty(model)) == pytest.approx(float(want), rel=1e-5)
    q = qj.quantize(model, reg)  # no grid of its own: k-means
    assert q.levels() == {"layers/0/kernel": 2, "layers/1/kernel": 2}
    qj.save(tmp_path / "m.qj", q)
    assert qj.load(tmp_path / "m.qj").levels() == q.levels()
    with pytest.raises(ValueError, match="new, non-empty name"):
        register(type("Again", (l1_family,), {}))
