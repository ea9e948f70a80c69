"""The compressed model file: bit packing, exact round trips, refusal of damaged files."""

import hashlib
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from qarjax import bitpack, compress
from qarjax.errors import ArtifactError
from qarjax.models import create_model
from qarjax.quantize import quantize_params
from qarjax.trees import leaves_with_paths


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(0, 300), st.randoms())
def test_pack_unpack_round_trip(bits, count, rnd):
    values = np.array([rnd.randrange(2**bits) for _ in range(count)], np.int64)
    packed = compress.pack_bits(values, bits)
    assert len(packed) == bits * -(-count // 8) == bitpack.packed_size(count, bits)
    unpacked = compress.unpack_bits(packed, bits, count)
    np.testing.assert_array_equal(unpacked, values)
    assert unpacked.dtype == (np.uint8 if bits <= 8 else np.uint16)
    np.testing.assert_array_equal(bitpack.unpack_bits(packed.tobytes(), bits, count), values)
    assert bitpack.padding_is_zero(packed, bits, count)


def test_bit_planes_follow_the_documented_layout():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**5, 1001)
    packed = compress.pack_bits(values, 5)
    # the README's numpy-only recipe: plane j holds bit j of every index
    planes = np.unpackbits(packed.reshape(5, -1), axis=1, count=1001)
    np.testing.assert_array_equal(sum(planes[j].astype(np.int64) << j for j in range(5)), values)
    assert planes.shape == (5, 1001) and np.array_equal(planes[0], values & 1)


def test_pack_bits_refuses_out_of_range_indices():
    with pytest.raises(ValueError, match="must be in"):
        compress.pack_bits(np.array([0, 4]), 2)
    with pytest.raises(ValueError, match="do not hold"):
        compress.unpack_bits(b"\x00" * 3, 2, 9)


@pytest.mark.parametrize("bits", [8, 13])
def test_packing_memory_is_linear_with_a_small_constant(bits):
    n = 4_000_000
    values = np.random.default_rng(1).integers(0, 2**bits, n, dtype=np.int32)
    tracemalloc.start()
    try:
        packed = compress.pack_bits(values, bits)
        _, pack_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        unpacked = compress.unpack_bits(packed, bits, n)
        _, unpack_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk = 16 * bitpack.CHUNK  # a few chunk-sized temporaries (an (n, bits) one: 4 * n * bits)
    assert pack_peak <= packed.nbytes + chunk, (pack_peak, packed.nbytes)
    assert unpack_peak - base <= unpacked.nbytes + chunk, (unpack_peak - base, unpacked.nbytes)
    np.testing.assert_array_equal(unpacked[:1000], values[:1000])


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
    layers, deq = quantize_params(params, kernels, method="uniform")  # kmeans: 20 s to compile
    return deq, stats, layers


def test_save_load_round_trip_is_exact(tmp_path):
    params, stats, layers = _model_parts()
    size = compress.save(
        tmp_path / "m.safetensors", config={"model": "cnn_small"}, params=params,
        batch_stats=stats, layers=layers, metadata={"note": "x"},
    )  # fmt: skip
    assert size == (tmp_path / "m.safetensors").stat().st_size
    art = compress.load(tmp_path / "m.safetensors")
    for name, layer in layers.items():
        np.testing.assert_array_equal(art.layers[name].indices, np.asarray(layer.indices))
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
        (lambda b: b[: len(b) // 2], "bytes after the last tensor|outside the"),
        (lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:], "checksum mismatch"),
        (lambda b: b + b"\x00", "1 bytes after the last tensor"),
        (lambda b: b"PICKLE" + b[6:], "not a qarjax compressed model: its header length"),
        (lambda b: b[:6], "not a qarjax compressed model: 6 bytes is too short"),
        (lambda b: b"QARJAX\x00\x01" + b[8:], "old-format .* re-run `qarjax quantize`"),
    ],
)
def test_damaged_files_are_refused(tmp_path, damage, message):
    params, stats, layers = _model_parts()
    path = tmp_path / "m.safetensors"
    compress.save(path, config={}, params=params, batch_stats=stats, layers=layers)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArtifactError, match=message):
        compress.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        compress.load(tmp_path / "nope.safetensors")
    (tmp_path / "tuned.qarjax").write_bytes(b"QARJAX\x00\x01")
    with pytest.raises(ArtifactError, match="tuned.qarjax there is the old format: re-run"):
        compress.load(tmp_path / "tuned.safetensors")
    with pytest.raises(ArtifactError, match="cannot read .*: it is a folder, not a model file"):
        compress.load(tmp_path)
    with pytest.raises(ArtifactError, match="/dev/zero is not a file"):
        compress.load("/dev/zero")


def test_any_safetensors_reader_opens_it(tmp_path):
    """No qarjax needed: safetensors.numpy reads every tensor, and the metadata rebuilds a
    layer's weights bit for bit."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    params, stats, layers = _model_parts()
    path = tmp_path / "m.safetensors"
    compress.save(path, config={"model": "cnn_small"}, params=params, batch_stats=stats,
                  layers=layers, metadata={"trained_steps": 3})  # fmt: skip
    tensors = load_file(path)
    with safe_open(path, "np") as f:
        meta = f.metadata()
    assert meta["format"] == "qarjax.compressed-model" and meta["format_version"] == "2"
    assert json.loads(meta["config"]) == {"model": "cnn_small"}
    assert json.loads(meta["metrics"]) == {"trained_steps": 3}
    info = json.loads(meta["layers"])["conv1/conv/kernel"]
    assert info == {"k": 4, "bits": 2, "shape": [3, 3, 3, 16]}
    n, bits = int(np.prod(info["shape"])), info["bits"]
    planes = np.unpackbits(tensors["indices/conv1/conv/kernel"].reshape(bits, -1), axis=1, count=n)
    idx = sum(planes[j].astype(np.int64) << j for j in range(bits))
    w = tensors["codebook/conv1/conv/kernel"][idx].reshape(info["shape"])
    np.testing.assert_array_equal(w, np.asarray(params["conv1"]["conv"]["kernel"]))
    np.testing.assert_array_equal(tensors["param/fc2/bias"], np.asarray(params["fc2"]["bias"]))
    assert "batch_stat/conv1/bn/mean" in tensors and "param/conv1/conv/kernel" not in tensors
    # the checksum covers the tensor bytes
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert hashlib.sha256(raw[8 + n :]).hexdigest() == meta["sha256"]


def test_list_keys_round_trip(tmp_path):
    """Integer keys (NNX lists: features/0/...) come back as ints; a key the name could not
    give back is refused at save time."""
    params = {"features": {0: {"k": np.ones((4, 2), np.float32)}, 1: {"b": np.zeros(2)}}}
    layers, deq = quantize_params(params, [(("features", 0, "k"), 2)], method="uniform")
    path = tmp_path / "m.safetensors"
    compress.save(path, config={}, params=deq, batch_stats={}, layers=layers)
    art = compress.load(path)
    assert set(art.params()["features"]) == {0, 1}
    assert art.layers["features/0/k"].path == ("features", 0, "k")
    for bad in ({"a/b": np.ones(2)}, {"7": np.ones(2)}, {"": np.ones(2)}):
        with pytest.raises(ValueError, match="cannot be stored"):
            compress.save(path, config={}, params=bad, batch_stats={}, layers={})


def test_the_readme_recipe_rebuilds_a_layer(tmp_path, monkeypatch):
    """The README's safetensors-and-numpy example, run as written on a saved model."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = readme.split("safetensors and numpy alone:\n\n```python\n", 1)[1].split("```")[0]
    params, stats, layers = _model_parts()
    compress.save(tmp_path / "tuned.safetensors", config={}, params=params, batch_stats=stats,
                  layers=layers)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(recipe, scope)
    np.testing.assert_array_equal(scope["w"], np.asarray(params["conv1"]["conv"]["kernel"]))


def test_another_programs_safetensors_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "hf.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, path, metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="format is 'pt', not .*not a qarjax compressed model"):
        compress.load(path)
    save_file({"w": np.ones((2, 2), np.float32)}, path)
    with pytest.raises(ArtifactError, match="no __metadata__ object: not a qarjax"):
        compress.load(path)
