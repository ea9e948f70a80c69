"""The compressed model file: bit packing, exact round trips, refusal of damaged files."""

import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from qarjax import compress
from qarjax.errors import ArtifactError
from qarjax.models import create_model
from qarjax.quantize import quantize_params
from qarjax.trees import leaves_with_paths


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(0, 300), st.randoms())
def test_pack_unpack_round_trip(bits, count, rnd):
    values = np.array([rnd.randrange(2**bits) for _ in range(count)], np.int64)
    packed = compress.pack_bits(values, bits)
    assert len(packed) == -(-count * bits // 8)
    np.testing.assert_array_equal(compress.unpack_bits(packed, bits, count), values)


def test_huffman_bits():
    assert compress.huffman_bits(np.array([5, 5])) == 10
    assert compress.huffman_bits(np.array([8, 0, 0, 0])) == 8  # one symbol: 1 bit each
    # counts 4,2,1,1 -> code lengths 1,2,3,3
    assert compress.huffman_bits(np.array([4, 2, 1, 1])) == 4 * 1 + 2 * 2 + 1 * 3 + 1 * 3


def _model_parts():
    model = create_model("cnn_small", num_classes=10)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    kernels = [
        (p, 4 if p[0] != "fc1" else 3) for p, _ in leaves_with_paths(params) if p[-1] == "kernel"
    ]
    layers, deq = quantize_params(params, kernels, method="kmeans")
    return deq, stats, layers


def test_save_load_round_trip_is_exact(tmp_path):
    params, stats, layers = _model_parts()
    size = compress.save(
        tmp_path / "m.qarjax", config={"model": "cnn_small"}, params=params,
        batch_stats=stats, layers=layers, metadata={"note": "x"},
    )  # fmt: skip
    assert size == (tmp_path / "m.qarjax").stat().st_size
    art = compress.load(tmp_path / "m.qarjax")
    assert art.config == {"model": "cnn_small"} and art.metadata == {"note": "x"}
    restored = art.params()
    for (p1, a), (p2, b) in zip(
        leaves_with_paths(params), leaves_with_paths(restored), strict=True
    ):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(a), b)  # bit for bit
    for (_, a), (_, b) in zip(
        leaves_with_paths(stats), leaves_with_paths(art.batch_stats), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), b)
    # About log2(K) bits per quantized weight: far smaller than float32.
    report = compress.size_report(params, layers, size)
    assert report["compression_ratio"] > 10
    assert size < report["float32_bytes"] / 8


def test_compression_ratio_follows_the_definition():
    params = {"k": np.zeros((10, 10), np.float32), "b": np.zeros(6, np.float32)}
    layers, deq = quantize_params(params, [(("k",), 4)], method="uniform")
    r = compress.size_report(deq, layers)
    assert r["compression_ratio"] == pytest.approx(32 * 106 / (100 * 2 + 32 * 4 + 32 * 6))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "checksum mismatch"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum mismatch"),
        (lambda b: b"PICKLE" + b[6:], "not a qarjax compressed model"),
        (lambda b: b[:10], "not a qarjax compressed model"),
    ],
)
def test_damaged_files_are_refused(tmp_path, damage, message):
    params, stats, layers = _model_parts()
    path = tmp_path / "m.qarjax"
    compress.save(path, config={}, params=params, batch_stats=stats, layers=layers)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArtifactError, match=message):
        compress.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        compress.load(tmp_path / "nope.qarjax")
