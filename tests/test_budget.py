"""qj.allocate_k: a K per layer for a size budget, from each layer's measured sensitivity."""

import numpy as np
import optax
import pytest
from flax import nnx

import qarjax as qj
from qarjax.budget import choose
from qarjax.compress import bits_for, size_report


class DigitsCNN(nnx.Module):
    """A small CNN on scikit-learn's 8x8 digits: two small convs, a large and a small dense."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 16, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x[..., None]))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def _ce(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _accuracy(model, x, y):
    return float((model(x).argmax(-1) == y).mean())


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)
    y = d.target[order].astype(np.int32)
    return (x[:1200], y[:1200]), (x[1200:1400], y[1200:1400]), (x[1400:], y[1400:])


def _trained(seed, train):
    x, y = train
    model = DigitsCNN(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        opt.update(model, nnx.grad(_ce)(model, x, y))

    rng = np.random.default_rng(seed)
    for _ in range(300):
        i = rng.integers(0, len(x), 64)
        step(model, opt, x[i], y[i])
    return model


def _test_loss_and_accuracy(model, q, test):
    quantized = q.into(nnx.clone(model))
    return float(_ce(quantized, *test)), _accuracy(quantized, *test)


def test_the_allocation_meets_its_size_and_is_never_worse_than_one_k(digits):
    """Measured on 600 training images, checked on the 397 test images, seeds 0 and 1. At the
    size of K = 4 everywhere (2 bits a weight) the allocation is never worse than K = 4 for
    all layers and better on some seed (the dense layer holds 93% of the weights, so the
    other choices are few); at 1.5 bits, where no one K fits but K = 2, it beats K = 2."""
    train, _, test = digits
    calibration = [(train[0][:600], train[1][:600])]
    gains = []
    for seed in range(2):
        model = _trained(seed, train)
        allocation = qj.allocate_k(model, _ce, calibration, bits_per_weight=2.0)
        assert allocation.bits_per_weight <= 2.0
        chosen = qj.quantize(model, k=allocation)
        uniform = qj.quantize(model, method="kmeans", k=4)
        index_bits = [
            sum(layer["weights"] * layer["bits_per_weight"] for layer in s["layers"].values())
            for s in (size_report(q.params, q.layers) for q in (chosen, uniform))
        ]
        assert index_bits[0] <= index_bits[1]
        assert chosen.levels() == allocation.k
        assert chosen.metadata["allocation"]["k"] == allocation.k
        ours, theirs = (_test_loss_and_accuracy(model, q, test) for q in (chosen, uniform))
        assert ours[0] <= theirs[0] + 1e-6, (seed, allocation.k, ours, theirs)
        gains.append(theirs[0] - ours[0])

        smaller = qj.allocate_k(model, _ce, calibration, bits_per_weight=1.5)
        assert 1.0 < smaller.bits_per_weight <= 1.5
        two = qj.quantize(model, method="kmeans", k=2)
        ours, theirs = (_test_loss_and_accuracy(model, qj.quantize(model, k=smaller), test),
                        _test_loss_and_accuracy(model, two, test))  # fmt: skip
        assert ours[0] < theirs[0] and ours[1] > theirs[1], (seed, smaller.k, ours, theirs)
    assert max(gains) > 0.02, gains  # better at equal size, not only equal


def test_choose_is_exact_for_the_additive_model():
    """Against brute force over every combination, on random sensitivities and sizes."""
    import itertools

    rng = np.random.default_rng(0)
    ks = (2, 4, 8, 16)
    for _ in range(30):
        weights = {f"l{i}": int(rng.integers(10, 5000)) for i in range(4)}
        sensitivity = {
            n: dict(zip(ks, np.sort(rng.exponential(1.0, 4))[::-1], strict=True)) for n in weights
        }
        budget = float(rng.uniform(1.2, 3.5))
        total = sum(weights.values())
        best = min(
            (sum(sensitivity[n][k] for n, k in zip(weights, combo, strict=True)), combo)
            for combo in itertools.product(ks, repeat=4)
            if sum(weights[n] * bits_for(k) for n, k in zip(weights, combo, strict=True))
            <= budget * total
        )
        chosen = choose(sensitivity, weights, budget)
        got = sum(sensitivity[n][chosen[n]] for n in weights)
        assert got == pytest.approx(best[0])


def test_a_budget_below_the_smallest_k_and_bad_arguments_are_one_line(digits):
    train, calibration, _ = digits
    model = DigitsCNN(nnx.Rngs(0))
    with pytest.raises(qj.QarjaxError, match=r"budget of 0.5 bits per weight is below what "
                       r"K = 2 costs \(1 bits per weight\)"):  # fmt: skip
        qj.allocate_k(model, _ce, [calibration], bits_per_weight=0.5)
    for kwargs, message in (
        ({"bits_per_weight": float("nan")}, "bits_per_weight must be > 0"),
        ({"bits_per_weight": 2, "ks": (1, 4)}, "ks are the candidate K"),
        ({"bits_per_weight": 2, "method": "magic"}, "unknown quantization method 'magic'"),
        ({"bits_per_weight": 2, "method": "nearest"}, "'nearest' needs a family's grid"),
        ({"bits_per_weight": 2, "include": "nothing"}, "fully matches no kernel"),
        ({"bits_per_weight": 16, "ks": (65536,)}, r"weights, fewer than every K in ks=\(65536,\)"),
    ):
        with pytest.raises(qj.QarjaxError, match=message):
            qj.allocate_k(model, _ce, [calibration], **kwargs)
    with pytest.raises(qj.QarjaxError, match="at least one batch"):
        qj.allocate_k(model, _ce, [], bits_per_weight=2)
    with pytest.raises(qj.QarjaxError, match=r"k names 'fc9/kernel', not a parameter"):
        qj.quantize(model, method="kmeans", k={"fc9/kernel": 4})
