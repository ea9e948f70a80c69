"""Seeded fuzzing of the compressed model file: thousands of damaged and crafted files through
the load path and the eval path, in process.

Each file is loaded (`compress.load_model`), checked against the rebuilt model and evaluated on a
tiny dataset (`pipeline.evaluate_artifact`, one Trainer whose eval compiles once). Kinds: byte
flips, truncations, appended bytes, and crafted headers with valid checksums (huge, negative
or odd shapes, wrong dtypes, out-of-range indices, bad bits and K, missing or extra keys,
duplicate names, headers that are not objects, overlapping or out-of-range offsets, NaN
values...), plus benign rewrites that must still load. Asserts: nothing but ArtifactError
escapes, every refusal is one line, every crafted file is refused, every benign one loads and
evaluates, and tracemalloc's peak stays below a small multiple of the file's size plus a
constant. Run with -s to see the counts.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import struct
import time
import tracemalloc

import jax
import model_files
import numpy as np
import pytest
from conftest import make_dataset

from qarjax import compress, pipeline
from qarjax.config import default_config
from qarjax.errors import ArtifactError
from qarjax.quantize import quantize_params
from qarjax.spec import build
from qarjax.train import Trainer
from qarjax.trees import leaves_with_paths

SEED = 20261123
# Peak traced bytes <= FACTOR * file bytes + CONSTANT, for loading alone and for the whole eval
# path (which adds the dequantized float32 weights and the eval's Python objects).
LOAD_FACTOR, LOAD_CONSTANT = 12, 64 << 10
EVAL_FACTOR, EVAL_CONSTANT = 24, 1 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    config = default_config()
    config.model, config.batch_size, config.eval_batch_size = "cnn_small", 16, 16
    config.progress = config.tensorboard = False
    dataset = make_dataset(n_train=32, n_test=16, size=16, classes=3)
    trainer = Trainer(build(config).for_tuning(), dataset)
    params = jax.device_get(trainer.initial_params)
    kernels = [(p, 16 if p[0] == "fc2" else 4 if p[0] != "conv2" else 3)
               for p, _ in leaves_with_paths(params) if p[-1] == "kernel"]  # fmt: skip
    layers, params = quantize_params(params, kernels, method="uniform")
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    compress.save(path, config={"model": "cnn_small"}, params=jax.device_get(params),
                  batch_stats=jax.device_get(trainer.initial_batch_stats),
                  layers=jax.device_get(layers), metadata={"trained_steps": 1})  # fmt: skip
    good = path.read_bytes()
    q = compress.load_model(path)
    reference = pipeline.evaluate_artifact(config, q, dataset, trainer=trainer)  # compiles once
    return {"config": config, "dataset": dataset, "trainer": trainer, "good": good,
            "dir": path.parent, "reference": reference, "params": q.params}  # fmt: skip


# ----------------------------------------------------------------------------- crafting
# Each crafter takes (rng, meta, tensors) of the good file and returns the bytes of a file
# whose checksum is valid for its data, and which must be refused.


def _pick(rng, seq):
    seq = list(seq)
    return seq[rng.integers(len(seq))]


def _layer(rng, meta):
    return _pick(rng, sorted(meta["layers"]))


def _with_header(meta, tensors, change):
    header, data = model_files.header_of(meta, tensors)
    change(header)
    return model_files.file_of(header, data)


def _tensor_field(field, values):
    def craft(rng, meta, tensors):
        name, value = _pick(rng, tensors), _pick(rng, values)
        return _with_header(meta, tensors, lambda h: h[name].__setitem__(field, value))

    craft.__name__ = f"bad tensor {field}"
    return craft


def _layer_field(field, values):
    def craft(rng, meta, tensors):
        meta["layers"][_layer(rng, meta)][field] = _pick(rng, values)
        return model_files.build(meta, tensors)

    craft.__name__ = f"bad layer {field}"
    return craft


def huge_shape(rng, meta, tensors):
    name = _pick(rng, tensors)
    dims = [int(d) for d in rng.integers(1, 2**62, rng.integers(1, 5), dtype=np.int64)]
    return _with_header(meta, tensors, lambda h: h[name].__setitem__("shape", dims))


def huge_layer_shape(rng, meta, tensors):
    name = _layer(rng, meta)
    meta["layers"][name]["shape"] = [10 ** int(rng.integers(6, 40)), 3]
    return model_files.build(meta, tensors)


def empty_huge_shape(rng, meta, tensors):  # 0 bytes of data, but no reshape can take it
    name = _pick(rng, [n for n in tensors if n.startswith("param/")])
    dims = _pick(rng, [[0, 2**70], [2**40, 0, 2**40], [0] + [2**31] * 3])
    tensors[name] = [tensors[name][0], dims, b""]
    return model_files.build(meta, tensors)


def no_layers(rng, meta, tensors):  # only float tensors: nothing quantized, nothing to tune
    for name in meta["layers"]:
        del tensors[f"indices/{name}"], tensors[f"codebook/{name}"]
    meta["layers"] = {}
    return model_files.build(meta, tensors)


def wrong_dtype(rng, meta, tensors):
    name = _pick(rng, tensors)
    dtypes = [d for d in ("F16", "F64", "BF16", "I32", "U8", "BOOL", "F32", "x", 4, None)
              if d != tensors[name][0]]  # fmt: skip
    value = _pick(rng, dtypes)
    return _with_header(meta, tensors, lambda h: h[name].__setitem__("dtype", value))


def small_codebook(rng, meta, tensors):  # indices reach K-1 of the good file: now >= K
    name = _layer(rng, meta)
    k = int(rng.integers(2, meta["layers"][name]["k"]))
    meta["layers"][name]["k"] = k
    cb = tensors[f"codebook/{name}"]
    cb[1], cb[2] = [k], cb[2][: 4 * k]
    return model_files.build(meta, tensors)


def non_finite(rng, meta, tensors):
    name = _pick(rng, [n for n in tensors if not n.startswith("indices/")])
    dtype, shape, raw = tensors[name]
    values = np.frombuffer(raw, np.float32).copy()
    values[rng.integers(values.size)] = _pick(rng, [np.nan, np.inf, -np.inf])
    tensors[name] = [dtype, shape, values.tobytes()]
    return model_files.build(meta, tensors)


def drop_key(rng, meta, tensors):
    where = _pick(rng, ["tensor", "meta", "layer"])
    if where == "meta":
        del meta[_pick(rng, compress.METADATA_KEYS[:-1])]  # sha256 is always rewritten
        return model_files.build(meta, tensors)
    if where == "layer":
        del meta["layers"][_layer(rng, meta)][_pick(rng, compress.LAYER_KEYS)]
        return model_files.build(meta, tensors)
    name, key = _pick(rng, tensors), _pick(rng, compress.TENSOR_KEYS)
    return _with_header(meta, tensors, lambda h: h[name].pop(key))


def extra_key(rng, meta, tensors):
    where = _pick(rng, ["tensor", "meta", "layer"])
    if where == "meta":
        meta["notes"] = "x"
        return model_files.build(meta, tensors)
    if where == "layer":
        meta["layers"][_layer(rng, meta)]["scale"] = 1
        return model_files.build(meta, tensors)
    name = _pick(rng, tensors)
    return _with_header(meta, tensors, lambda h: h[name].__setitem__("offset", 0))


def duplicate_name(rng, meta, tensors):
    header, data = model_files.header_of(meta, tensors)
    name = _pick(rng, list(header))
    raw = json.dumps(header).encode()
    return model_files.file_of(
        raw[:-1] + b", " + json.dumps({name: header[name]}).encode()[1:], data
    )


def duplicate_in_metadata_json(rng, meta, tensors):
    header, data = model_files.header_of(meta, tensors)
    key = _pick(rng, ["config", "layers", "metrics"])
    text = header["__metadata__"][key]
    header["__metadata__"][key] = '{"a": 1, "a": 2}' if text == "{}" else text[:-1] + ', ' + (
        text[1:])  # fmt: skip
    return model_files.file_of(header, data)


def not_an_object(rng, meta, tensors):
    value = _pick(rng, [[], [1, 2], 7, "text", None, 1.5, True])
    where = _pick(rng, ["header", "metadata", "tensor", "layers", "layer", "config", "value"])
    if where in ("layers", "config"):
        meta[where] = value
        return model_files.build(meta, tensors)
    if where == "layer":
        meta["layers"][_layer(rng, meta)] = value
        return model_files.build(meta, tensors)
    header, data = model_files.header_of(meta, tensors)
    if where == "header":
        header = value
    elif where == "metadata":
        header["__metadata__"] = value
    elif where == "value":
        header["__metadata__"][_pick(rng, ["format", "config", "metrics"])] = value
    else:
        header[_pick(rng, tensors)] = value
    return model_files.file_of(header, data)


def bad_offsets(rng, meta, tensors):
    names = list(tensors)
    i = int(rng.integers(len(names)))
    how = _pick(rng, ["overlap", "past", "negative", "reversed", "gap", "length", "float"])

    def change(h):
        begin, end = h[names[i]]["data_offsets"]
        new = {"overlap": [begin - 4, end - 4] if i else [begin + 4, end + 4],
               "past": [begin, 10 ** int(rng.integers(7, 20))],
               "negative": [-8, end], "reversed": [end, begin], "gap": [begin + 8, end + 8],
               "length": [begin, end - 1], "float": [float(begin), end]}[how]  # fmt: skip
        h[names[i]]["data_offsets"] = new

    return _with_header(meta, tensors, change)


def bad_name(rng, meta, tensors):
    name = _pick(rng, [n for n in tensors if n.startswith(("param/", "batch_stat/"))])
    new = _pick(rng, ["weights/" + name, name.replace("/", "//", 1), name + "/", "param",
                      name.replace("/", "/01/", 1), name + "\n", name.split("/")[0] + "/" +
                      "conv1/0/x", "param/conv1/conv/kernel", "param/" + name])  # fmt: skip
    tensors[new] = tensors.pop(name)
    return model_files.build(meta, tensors)


def layer_without_tensor(rng, meta, tensors):
    name = _layer(rng, meta)
    if rng.integers(2):
        del tensors[f"{_pick(rng, ['indices', 'codebook'])}/{name}"]
    else:
        del meta["layers"][name]  # its tensors become orphans
    return model_files.build(meta, tensors)


def bad_metadata_value(rng, meta, tensors):
    key = _pick(rng, ["format", "format_version", "sha256", "metrics", "config"])
    value = {"format": "safetensors", "format_version": _pick(rng, ["1", "3", "", "2.0"]),
             "metrics": "{not json", "config": "[1, 2]"}.get(key)  # fmt: skip
    header, data = model_files.header_of(meta, tensors)
    header["__metadata__"][key] = value or _pick(rng, ["0" * 63, "G" * 64, "A" * 64])
    return model_files.file_of(header, data)


def bad_header_length(rng, meta, tensors):
    blob = model_files.build(meta, tensors)
    (n,) = struct.unpack("<Q", blob[:8])
    new = _pick(rng, [0, 1, n - int(rng.integers(1, 50)), n + int(rng.integers(1, 50)),
                      len(blob), 2**64 - 1, 2**40])  # fmt: skip
    return struct.pack("<Q", new) + blob[8:]


def bad_bytes_header(rng, meta, tensors):
    header, data = model_files.header_of(meta, tensors)
    raw = _pick(rng, [b"\xff\xfe" + json.dumps(header).encode(), b"[" * 50000 + b"]" * 50000,
                      b"{" * 30000, json.dumps(header).encode()[:-2], b"   ", b"QARJAX",
                      json.dumps(header).replace('"F32"', "NaN").encode()])  # fmt: skip
    return model_files.file_of(raw, data)


def old_magic(rng, meta, tensors):
    return b"QARJAX\x00\x01" + model_files.build(meta, tensors)[8:]


CRAFTED = [
    huge_shape, huge_layer_shape, empty_huge_shape, no_layers, wrong_dtype, small_codebook,
    non_finite, drop_key, extra_key,
    duplicate_name, duplicate_in_metadata_json, not_an_object, bad_offsets, bad_name,
    layer_without_tensor, bad_metadata_value, bad_header_length, bad_bytes_header, old_magic,
    _tensor_field("shape", [[-1], [3, -4], "big", [1.5], [True], None, [[2]], [1] * 9, {}]),
    _layer_field("bits", [0, 17, -1, 32, 1.5, "2", True, None]),
    _layer_field("k", [0, 1, 65537, "4", 4.0, None, 2**40]),
    _layer_field("shape", [[-1], "x", [1] * 9, [7], [2, 2], None, [0, 3], [0, 2**70]]),
]  # fmt: skip


# Benign rewrites: a reader must accept them (and get the good file's weights).


def reordered_data(rng, meta, tensors):
    names = list(tensors)
    order = rng.permutation(len(names))
    return model_files.build(meta, {names[i]: tensors[names[i]] for i in order})


def new_metrics(rng, meta, tensors):
    meta["metrics"] = {"trained_steps": int(rng.integers(100)), "note": 'é\n"x"'}
    return model_files.build(meta, tensors)


def padded_header(rng, meta, tensors):
    header, data = model_files.header_of(meta, tensors)
    raw = json.dumps(header, indent=int(rng.integers(0, 3))).encode()
    return model_files.file_of(raw + b" " * int(rng.integers(0, 9)), data)


def new_codebook(rng, meta, tensors):
    name = _layer(rng, meta)
    cb = tensors[f"codebook/{name}"]
    cb[2] = rng.normal(0, 0.1, cb[1][0]).astype(np.float32).tobytes()
    return model_files.build(meta, tensors)


BENIGN = [reordered_data, new_metrics, padded_header, new_codebook]


def _variants(good: bytes, rng):
    """(kind, expectation, bytes) of every fuzzed file: expectation refuse / load / any."""
    meta, tensors = model_files.split(good)

    def fresh():
        return copy.deepcopy(meta), {k: list(v) for k, v in tensors.items()}

    data_start = 8 + struct.unpack("<Q", good[:8])[0]
    for _ in range(400):  # flips anywhere: header flips may keep a valid file
        blob = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            blob[int(rng.integers(len(blob)))] ^= int(rng.integers(1, 256))
        yield "byte flip", "any", bytes(blob)
    for _ in range(200):  # flips of the tensor data: the checksum catches every one
        blob = bytearray(good)
        blob[int(rng.integers(data_start, len(blob)))] ^= int(rng.integers(1, 256))
        yield "data byte flip", "refuse", bytes(blob)
    for _ in range(250):
        yield "truncation", "refuse", good[: int(rng.integers(len(good)))]
    for _ in range(250):
        junk = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        yield "appended bytes", "refuse", good + junk
    for _ in range(50):
        for craft in CRAFTED:
            yield craft.__name__, "refuse", craft(rng, *fresh())
    for _ in range(40):
        for craft in BENIGN:
            yield craft.__name__, "load", craft(rng, *fresh())
    for _ in range(150):  # a crafted file, then a flipped byte (which might repair it)
        blob = bytearray(_pick(rng, CRAFTED)(rng, *fresh()))
        if blob:
            blob[int(rng.integers(len(blob)))] ^= int(rng.integers(1, 256))
        yield "crafted + flip", "any", bytes(blob)


def _load_and_eval(path, world, after_load=lambda: None) -> dict:
    art = compress.load(path)  # the parse: memory within a small multiple of the file
    after_load()
    q = art.to_model()  # dequantized float32 kernels: up to 32x the packed indices
    return pipeline.evaluate_artifact(
        world["config"], q, world["dataset"], trainer=world["trainer"]
    )


def test_fuzzed_model_files_are_refused_in_one_line_within_bounded_memory(world):
    rng = np.random.default_rng(SEED)
    path = world["dir"] / "fuzzed.safetensors"
    counts, refused, loaded = collections.Counter(), collections.Counter(), collections.Counter()
    problems, largest = [], {"load": (0, 0, ""), "eval": (0, 0, "")}
    load_peak = [0]

    def note_load_peak():
        load_peak[0] = tracemalloc.get_traced_memory()[1] - base

    began = time.perf_counter()
    tracemalloc.start()
    try:
        for kind, expect, blob in _variants(world["good"], rng):
            counts[kind] += 1
            path.write_bytes(blob)
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            outcome, load_peak[0] = None, None
            try:
                result = _load_and_eval(path, world, note_load_peak)
                loaded[kind] += 1
                if not (0 <= result["accuracy"] <= 1 or math.isnan(result["accuracy"])):
                    problems.append(f"{kind}: accuracy {result['accuracy']}")
            except ArtifactError as e:
                refused[kind] += 1
                outcome = str(e)
                if "\n" in outcome or "\r" in outcome or not outcome:
                    problems.append(f"{kind}: a refusal of more than one line: {outcome!r}")
            except Exception as e:  # noqa: BLE001  (what the test looks for)
                problems.append(f"{kind}: uncaught {type(e).__name__}: {str(e)[:200]}")
            extra = tracemalloc.get_traced_memory()[1] - base
            peaks = {"eval": extra, "load": extra if load_peak[0] is None else load_peak[0]}
            for stage, factor, constant in (("load", LOAD_FACTOR, LOAD_CONSTANT),
                                            ("eval", EVAL_FACTOR, EVAL_CONSTANT)):  # fmt: skip
                if peaks[stage] > largest[stage][0]:
                    largest[stage] = (peaks[stage], len(blob), kind)
                if peaks[stage] > factor * len(blob) + constant:
                    problems.append(f"{kind}: {stage} peak {peaks[stage]} B, {len(blob)} B file")
            if expect == "refuse" and outcome is None:
                problems.append(f"{kind}: a file that must be refused loaded and evaluated")
            if expect == "load" and outcome is not None:
                problems.append(f"{kind}: a benign rewrite was refused: {outcome}")
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - began
    total = sum(counts.values())
    print(
        f"\nfuzzed {total} files ({len(world['good'])}-byte original) in {seconds:.1f} s: "
        f"{sum(refused.values())} refused, {sum(loaded.values())} loaded and evaluated"
    )
    for stage, (peak, size, kind) in largest.items():
        print(f"  largest {stage} peak (tracemalloc): {peak} bytes, {kind}, {size}-byte file")
    for kind in counts:
        print(f"  {kind:28s} {counts[kind]:4d} files  {refused[kind]:4d} refused  "
              f"{loaded[kind]:4d} loaded")  # fmt: skip
    assert not problems, "\n".join(problems[:20])
    assert total >= 2000
    assert sum(loaded.values()) >= 160 and sum(refused.values()) >= 1500


def test_benign_rewrites_give_the_same_weights(world):
    rng = np.random.default_rng(SEED + 1)
    meta, tensors = model_files.split(world["good"])
    path = world["dir"] / "reordered.safetensors"
    path.write_bytes(reordered_data(rng, meta, tensors))
    ours = compress.load(path).params()
    for (p1, a), (p2, b) in zip(
        leaves_with_paths(world["params"]), leaves_with_paths(ours), strict=True
    ):
        assert p1 == p2
        np.testing.assert_array_equal(a, b)
    result = _load_and_eval(path, world)
    assert result == world["reference"]


_RSS_OF_LOAD = """
import resource, sys
from qarjax import compress
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    compress.load(sys.argv[1])
except compress.ArtifactError as e:
    print(str(e)[:200])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.parametrize(
    "shape", ["one long string", "many keys", "lists in a metadata string", "too large"]
)
def test_large_crafted_headers_are_read_within_bounded_memory(tmp_path, shape):
    """The peak RSS of a fresh process (what tracemalloc cannot see: the regex engine's own
    memory) for the worst headers we know: one 16 MB JSON string once took 2.6 GB; unique
    keys take ~16x their bytes; a header above compress.MAX_HEADER_BYTES is never read."""
    import json
    import struct
    import subprocess
    import sys

    n = compress.MAX_HEADER_BYTES - 64 if shape != "too large" else 4 * compress.MAX_HEADER_BYTES
    if shape == "one long string":
        header = json.dumps({"__metadata__": {"format": "x" * n}}).encode()
    elif shape == "many keys":
        header = json.dumps({f"k{i:09d}": 1 for i in range(n // 18)}).encode()
    elif shape == "lists in a metadata string":  # strings are skipped by the header's count
        meta = {"format": compress.FORMAT, "format_version": compress.VERSION, "config": "{}",
                "layers": "{}", "sha256": "0" * 64}  # fmt: skip
        metrics = "[" + "[]," * ((n - 300) // 3) + "[]]"
        header = json.dumps({"__metadata__": {**meta, "metrics": metrics}}).encode()
    else:
        header = b'"' + b"x" * (n - 2) + b'"'
    assert len(header) <= compress.MAX_HEADER_BYTES or shape == "too large"
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    out = subprocess.run([sys.executable, "-c", _RSS_OF_LOAD, str(path)], capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()  # fmt: skip
    assert len(out) == 2 and out[0].startswith(str(path)), out  # refused in one line
    # unique keys parse to ~16x their bytes; lists in a metadata string are refused unparsed
    factor = 6 if shape == "lists in a metadata string" else 18  # parsed: ~20x (330-435 MB)
    assert int(out[1]) <= factor * min(len(header), compress.MAX_HEADER_BYTES) + (64 << 20), out
    if shape == "too large":
        assert "does not fit" in out[0] and int(out[1]) < 64 << 20
