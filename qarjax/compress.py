"""The compressed model file: a `.safetensors` file of bit-packed indices, codebooks, float
leftovers and batch statistics, its facts in the safetensors metadata.

Any safetensors reader opens it (``safetensors.numpy.load_file``; no qarjax needed). Tensor
names are a kind and the "/"-joined key path of the parameter (`trees.path_name`; a key of
digits is a list index)::

    indices/<layer>     U8    [bits * ceil(n / 8)]   the layer's n cluster indices, as bit
                                                     planes (`qarjax.bitpack`'s layout)
    codebook/<layer>    F32   [K]                    the layer's K values
    param/<path>        F32   the parameter's shape  every parameter that is not quantized
    batch_stat/<path>   F32   the statistic's shape  batch-norm statistics

Metadata (``__metadata__``, str -> str)::

    format           "qarjax.compressed-model"
    format_version   "2"  (1 was the earlier hand-written `.qarjax` file, now refused)
    config           the run's config, JSON
    layers           JSON {layer: {"k": K, "bits": bits, "shape": [...]}}
    metrics          JSON object: the saving stage's facts (`save(metadata=...)`)
    sha256           hex SHA-256 of the tensor bytes (everything after the header; the
                     header itself is checked field by field, not checksummed)

`load` reads the header (bounded by the file's size), parses it itself and checks every field
before anything is allocated from it: JSON with no duplicate keys, no missing or unknown keys,
dtypes, shapes, byte ranges that tile the data exactly, bits in [1, 16], 2 <= K <= 2**bits,
then the checksum, finite values and indices < K. Anything else is refused with one
ArtifactError line. Its memory: parsing the header (at most MAX_HEADER_BYTES), at most ~16x
the header's bytes (a header opening more JSON objects and lists than one per 16 bytes, its
metadata's JSON texts counted with it, is refused unparsed; strings are skipped by a scan of
O(1) memory); shapes of at most MAX_ELEMENTS entries, a layer's never empty, and at least
one layer; then the file's bytes, a copy of the floats, and the indices unpacked to
uint8/uint16 (at most 8 bytes per packed byte).

Sizes reported (`size_report`): bytes on disk, the compression ratio against float32 as
regularizers.md defines it, and the entropy-coded size of the indices (Huffman code lengths
from each layer's index frequencies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import re
import stat
import struct
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy

from qarjax.bitpack import pack_bits, packed_size, padding_is_zero, unpack_bits
from qarjax.errors import ArtifactError
from qarjax.files import write_atomic
from qarjax.metrics import to_python
from qarjax.quantize import QuantizedLayer, QuantizedModel
from qarjax.trees import Path as KeyPath
from qarjax.trees import leaves_with_paths, path_name, set_in

__all__ = ["Artifact", "bits_for", "huffman_bits", "load", "pack_bits", "save", "size_report"]

FORMAT = "qarjax.compressed-model"
VERSION = "2"
OLD_MAGIC = b"QARJAX\x00"  # the format-1 `.qarjax` file began with it
SUFFIX = ".safetensors"
KINDS = {"indices": "U8", "codebook": "F32", "param": "F32", "batch_stat": "F32"}
METADATA_KEYS = ("format", "format_version", "config", "layers", "metrics", "sha256")
LAYER_KEYS = ("bits", "k", "shape")
TENSOR_KEYS = ("data_offsets", "dtype", "shape")
MAX_RANK = 8
MAX_ELEMENTS = 1 << 40  # per tensor: far beyond any model's, far below numpy's index range
MAX_HEADER_BYTES = 16 << 20  # ~100 bytes a tensor: room for 160,000 tensors and the config
_SHA_TOKEN = b'"sha256":"%s"'
_JSON_TOKEN = re.compile(rb'["{[]')  # a string's start, { or [
BYTES_PER_CONTAINER = 16  # a model file's header spends >= 19 bytes per JSON object or list
_REMAKE = "re-run `qarjax quantize` and `qarjax tune` on the workdir to write it as .safetensors"


def bits_for(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def huffman_bits(counts: np.ndarray) -> int:
    """Total bits of a Huffman code for symbols with these counts (one symbol: 1 bit each)."""
    counts = [int(c) for c in counts if c > 0]
    if len(counts) <= 1:
        return sum(counts)
    heap = list(counts)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:  # each merge adds one bit to every symbol below it
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@dataclasses.dataclass
class Artifact:
    """A loaded compressed model: its config, quantized layers, float params and stats.

    The layers' indices are uint8 (K <= 256) or uint16 arrays of the kernels' shapes.
    """

    config: dict
    layers: dict[str, QuantizedLayer]
    float_params: dict  # nested dict of the unquantized params
    batch_stats: dict
    metadata: dict  # the file's metrics (save's `metadata`)

    def params(self) -> dict:
        """The dequantized params tree (quantized kernels rebuilt from their codebooks)."""
        tree = self.float_params
        for layer in self.layers.values():
            tree = set_in(tree, layer.path, np.asarray(layer.codebook)[np.asarray(layer.indices)])
        return tree

    def to_model(self) -> QuantizedModel:
        """The `QuantizedModel` the stages pass along (kernels dequantized: float32, so
        1 / bits of a layer's indices' size times 32)."""
        return QuantizedModel(
            self.params(), self.batch_stats, self.layers, self.config, self.metadata
        )


# ----------------------------------------------------------------------------- names


def tensor_name(kind: str, key_path: KeyPath) -> str:
    """`kind/<path_name>`; refuses keys the name could not give back (see `key_path_of`)."""
    for key in key_path:
        bad = isinstance(key, str) and (
            not key or "/" in key or key.isdigit() or not key.isprintable()
        )
        if bad or not isinstance(key, str | int) or isinstance(key, bool):
            raise ValueError(f"key {key!r} of {key_path} cannot be stored in a tensor name")
    return f"{kind}/{path_name(key_path)}"


def key_path_of(name: str) -> KeyPath | None:
    """The key path a "/"-joined name stands for (keys of digits are ints), None if none."""
    keys = name.split("/")
    if not name.isprintable() or any(not k for k in keys):
        return None
    out = []
    for k in keys:
        if k.isdigit() and k.isascii():
            if str(int(k)) != k:  # no leading zeros: one name per path
                return None
            out.append(int(k))
        else:
            out.append(k)
    return tuple(out)


# ----------------------------------------------------------------------------- save


def save(
    path: str | Path,
    *,
    config: dict,
    params: dict,
    batch_stats: dict,
    layers: dict[str, QuantizedLayer],
    metadata: dict | None = None,
) -> int:
    """Writes a compressed model (a .safetensors file) atomically; returns its size in bytes.

    Args:
      params: the full params tree; the kernels named in `layers` are stored quantized.
      batch_stats: batch-norm statistics (stored float32).
      layers: quantized kernels by name (indices + codebook).
      metadata: extra JSON-ready facts (accuracies, trained_steps...), stored as `metrics`.
    """
    tensors, layer_info, quantized_paths = {}, {}, set()
    for layer in layers.values():
        idx = np.asarray(layer.indices)
        bits = bits_for(layer.k)
        tensors[tensor_name("indices", layer.path)] = pack_bits(idx, bits)
        tensors[tensor_name("codebook", layer.path)] = np.asarray(layer.codebook, np.float32)
        layer_info[path_name(layer.path)] = {"k": layer.k, "bits": bits, "shape": list(idx.shape)}
        quantized_paths.add(tuple(layer.path))
    for key_path, leaf in leaves_with_paths(params):
        if tuple(key_path) not in quantized_paths:
            tensors[tensor_name("param", key_path)] = np.asarray(leaf, np.float32)
    for key_path, leaf in leaves_with_paths(batch_stats):
        tensors[tensor_name("batch_stat", key_path)] = np.asarray(leaf, np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    placeholder = "0" * 64
    info = {
        "format": FORMAT,
        "format_version": VERSION,
        "config": json.dumps(config, sort_keys=True),
        "layers": json.dumps(layer_info, sort_keys=True),
        "metrics": json.dumps(metadata or {}, sort_keys=True),
        "sha256": placeholder,
    }
    blob = bytearray(safetensors.numpy.save(tensors, metadata=info))
    (n,) = struct.unpack_from("<Q", blob)
    digest = hashlib.sha256(memoryview(blob)[8 + n :]).hexdigest()
    header = bytes(blob[8 : 8 + n])
    token = _SHA_TOKEN % placeholder.encode()
    if header.count(token) != 1:  # the metadata is JSON-escaped, so this is the key's value
        raise RuntimeError("cannot place the checksum in the safetensors header")
    blob[8 : 8 + n] = header.replace(token, _SHA_TOKEN % digest.encode())
    write_atomic(path, bytes(blob), "model file")
    return len(blob)


# ----------------------------------------------------------------------------- load


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {_show(key)}")
        out[key] = value
    return out


def _show(x, limit: int = 60) -> str:
    """A short one-line rendering of an untrusted value."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(x) -> bool:
    """A list of at most MAX_RANK sizes whose product, zeros read as ones, is at most
    MAX_ELEMENTS (a zero-size tensor's other sizes must fit a reshape too)."""
    return (
        isinstance(x, list)
        and len(x) <= MAX_RANK
        and all(_is_int(d) and 0 <= d <= MAX_ELEMENTS for d in x)
        and math.prod(max(d, 1) for d in x) <= MAX_ELEMENTS
    )


def load(path: str | Path) -> Artifact:
    """Reads and verifies a compressed model (see the module docstring for what is checked).

    Nothing in the file is executed, nothing is allocated from a header field before the
    field is checked against the file's size, and a truncated, altered or crafted file is
    refused with one ArtifactError line, never a crash.
    """
    path = Path(path)
    if not path.exists():
        old = path.with_suffix(".qarjax")
        hint = f" ({old.name} there is the old format: {_REMAKE})" if old.is_file() else ""
        raise ArtifactError(f"compressed model not found: {path}{hint}")
    if path.is_dir():
        raise ArtifactError(f"cannot read {path}: it is a folder, not a model file")
    if not path.is_file():  # a FIFO or a device: opening one may wait forever for a writer
        raise ArtifactError(f"{path} is not a file (a FIFO, socket or device)")
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ArtifactError(f"{path} is not a file")
            return _read(path, f, info.st_size)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None


def _read(path: Path, f, size: int) -> Artifact:
    def fail(what: str):
        raise ArtifactError(f"{path}: {what}")

    head = f.read(8)
    if head.startswith(OLD_MAGIC):
        raise ArtifactError(f"{path} is an old-format (.qarjax, format 1) model file: {_REMAKE}")
    if len(head) < 8:
        raise ArtifactError(f"{path} is not a qarjax compressed model: {size} bytes is too short")
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
        raise ArtifactError(
            f"{path} is not a qarjax compressed model: its header length {n} does not fit "
            f"its {size} bytes"
        )
    raw = f.read(n)
    if len(raw) != n:
        fail("the file is shorter than its header length says")
    # each object or list parses to ~60+ bytes: the header's, and those of the JSON texts
    # in its metadata strings (parsed next), count against one budget
    budget = 2 + n // BYTES_PER_CONTAINER
    budget -= _containers(raw, limit=budget)
    if budget < 0:
        fail("the header holds more JSON objects and lists than a model file's could")
    header = _parse_json(raw, "header", fail)
    del raw
    if not isinstance(header, dict):
        fail(f"the header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - n
    meta, layer_info = _check_metadata(header.pop("__metadata__", None), budget, fail)
    entries = {name: _check_tensor(name, e, data_bytes, fail) for name, e in header.items()}
    _check_tiling(entries, data_bytes, fail)
    _check_layers(layer_info, entries, fail)

    data = f.read(data_bytes + 1)
    if len(data) != data_bytes:
        fail("the file changed while it was read")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        fail("truncated or altered: checksum mismatch")
    return _build(entries, layer_info, meta, memoryview(data), fail)


def _containers(raw: bytes, limit: int) -> int:
    """How many objects and lists the JSON text `raw` opens, counted up to `limit` + 1
    (strings skipped; O(len) time and O(1) memory: a regex repetition over a long string
    would take memory per character)."""
    count, i = 0, 0
    while (m := _JSON_TOKEN.search(raw, i)) is not None:
        if raw[m.start()] != 0x22:  # { or [
            count += 1
            if count > limit:
                return count
            i = m.end()
            continue
        j = m.end()  # inside a string: its end is the next quote not escaped
        while True:
            j = raw.find(b'"', j)
            if j < 0:
                return count  # unterminated: the parser refuses it
            escapes = 0
            while raw[j - 1 - escapes] == 0x5C:  # each backslash run is read once
                escapes += 1
            if escapes % 2 == 0:
                break
            j += 1
        i = j + 1
    return count


def _parse_json(raw: bytes | str, what: str, fail):
    """JSON with no duplicate keys; anything else is refused as a corrupt `what`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        fail(f"corrupt {what}: {e}")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        detail = str(e).splitlines()[0][:80] if str(e) else ""
        fail(f"corrupt {what}: {type(e).__name__}" + (f": {detail}" if detail else ""))


def _check_metadata(meta, budget: int, fail) -> tuple[dict, dict]:
    """(metadata with config/metrics parsed, {layer name: {k, bits, shape}}), all checked."""
    if not isinstance(meta, dict):
        fail("the header has no __metadata__ object: not a qarjax compressed model")
    if meta.get("format") != FORMAT:
        fail(
            f"__metadata__ format is {_show(meta.get('format'))}, not {FORMAT!r}: "
            "not a qarjax compressed model"
        )
    _check_keys(meta, METADATA_KEYS, "__metadata__", fail)
    for key, value in meta.items():
        if not isinstance(value, str):
            fail(f"__metadata__ value {key} is a JSON {type(value).__name__}, not a string")
    if meta["format_version"] != VERSION:
        fail(f"format version {_show(meta['format_version'])}: this qarjax reads version {VERSION}")
    sha = meta["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        fail("__metadata__ sha256 is not 64 lowercase hex digits")
    out = dict(meta)
    for key in ("config", "layers", "metrics"):
        budget -= _containers(meta[key].encode(), limit=budget)
        if budget < 0:
            fail(f"__metadata__ {key} holds more JSON objects and lists than a model's could")
        out[key] = _parse_json(meta[key], f"__metadata__ {key}", fail)
        if not isinstance(out[key], dict):
            fail(f"__metadata__ {key} is a JSON {type(out[key]).__name__}, not an object")
    layers = {}
    for name, e in out["layers"].items():
        where = f"layer {_show(name)}"
        if key_path_of(name) is None:
            fail(f"{where} is not a /-joined key path")
        if not isinstance(e, dict):
            fail(f"{where} is a JSON {type(e).__name__}, not an object")
        _check_keys(e, LAYER_KEYS, where, fail)
        bits, k, shape = e["bits"], e["k"], e["shape"]
        if not (_is_int(bits) and 1 <= bits <= 16):
            fail(f"{where}: bits must be an integer in [1, 16], got {_show(bits)}")
        if not (_is_int(k) and 2 <= k <= 2**bits):
            fail(f"{where}: K must be an integer in [2, 2**bits = {2**bits}], got {_show(k)}")
        if not _is_shape(shape) or math.prod(shape) == 0:
            fail(f"{where} has a bad shape {_show(shape)}")
        layers[name] = e
    if not layers:
        fail("__metadata__ layers is empty: the file holds no quantized layer")
    return out, layers


def _check_keys(d: dict, keys: tuple, where: str, fail) -> None:
    missing, unknown = set(keys) - d.keys(), d.keys() - set(keys)
    if missing:
        fail(f"{where} lacks {', '.join(sorted(missing))}")
    if unknown:
        fail(f"{where} has unknown keys {_show(sorted(unknown)[:4])}")


def _check_tensor(name: str, e, data_bytes: int, fail) -> dict:
    """The entry of tensor `name` with its kind and key path, every field checked."""
    where = f"tensor {_show(name)}"
    kind, _, rest = name.partition("/")
    if kind not in KINDS:
        fail(f"{where} is of no known kind (names start {', '.join(k + '/' for k in KINDS)})")
    key_path = key_path_of(rest)
    if key_path is None:
        fail(f"{where} does not name a /-joined key path")
    if not isinstance(e, dict):
        fail(f"{where} is a JSON {type(e).__name__}, not an object")
    _check_keys(e, TENSOR_KEYS, where, fail)
    if e["dtype"] != KINDS[kind]:
        fail(f"{where} has dtype {_show(e['dtype'])}, a {kind} tensor is {KINDS[kind]}")
    if not _is_shape(e["shape"]) or (kind != "param" and kind != "batch_stat"
                                     and len(e["shape"]) != 1):  # fmt: skip
        fail(f"{where} has a bad shape {_show(e['shape'])}")
    offsets = e["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):  # fmt: skip
        fail(f"{where} has data_offsets {_show(offsets)} outside the {data_bytes} data bytes")
    itemsize = 1 if kind == "indices" else 4
    if offsets[1] - offsets[0] != itemsize * math.prod(e["shape"]):
        fail(f"{where}: {offsets[1] - offsets[0]} bytes do not hold shape {_show(e['shape'])}")
    return {"kind": kind, "path": key_path, "shape": e["shape"], "offsets": offsets}


def _check_tiling(entries: dict, data_bytes: int, fail) -> None:
    """The tensors' byte ranges must tile the data: no gap, no overlap, nothing after."""
    end = 0
    for name, e in sorted(entries.items(), key=lambda ne: tuple(ne[1]["offsets"])):
        begin, stop = e["offsets"]
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            fail(f"tensor {_show(name)} {what} (data_offsets {begin} != {end})")
        end = stop
    if end != data_bytes:
        fail(f"{data_bytes - end} bytes after the last tensor: truncated or appended to")


def _check_layers(layers: dict, entries: dict, fail) -> None:
    for name, e in layers.items():
        n = math.prod(e["shape"])
        need = {"indices": [packed_size(n, e["bits"])], "codebook": [e["k"]]}
        for kind, shape in need.items():
            t = entries.get(f"{kind}/{name}")
            if t is None:
                fail(f"layer {_show(name)} has no {kind} tensor")
            if t["shape"] != shape:
                fail(f"{kind} of layer {_show(name)} has shape {_show(t['shape'])}, not {shape}")
    for name, e in entries.items():
        layer = name.partition("/")[2]
        if e["kind"] in ("indices", "codebook") and layer not in layers:
            fail(f"tensor {_show(name)} belongs to no layer of __metadata__ layers")


def _build(entries: dict, layers: dict, meta: dict, data: memoryview, fail) -> Artifact:
    def values(e, dtype):
        begin, end = e["offsets"]
        return np.frombuffer(data[begin:end], dtype)

    def floats(name, e):
        array = values(e, np.float32).reshape(e["shape"]).copy()
        if not np.all(np.isfinite(array)):
            fail(f"tensor {_show(name)} holds non-finite values")
        return array

    float_params, batch_stats, claimed, quantized = {}, {}, {}, {}
    for name in sorted(layers):
        e, n = layers[name], math.prod(layers[name]["shape"])
        packed = values(entries[f"indices/{name}"], np.uint8)
        if not padding_is_zero(packed, e["bits"], n):
            fail(f"indices of layer {_show(name)}: the planes' pad bits are not zero")
        idx = unpack_bits(packed, e["bits"], n)
        if n and int(idx.max()) >= e["k"]:
            fail(f"indices of {name} reach {int(idx.max())}, its codebook has K = {e['k']}")
        codebook = floats(f"codebook/{name}", entries[f"codebook/{name}"])
        key_path = key_path_of(name)
        claimed = _set_leaf(claimed, key_path, True, name, fail)
        quantized[name] = QuantizedLayer(key_path, idx.reshape(e["shape"]), codebook)
    for name, e in sorted(entries.items()):
        if e["kind"] == "param":
            array = floats(name, e)
            claimed = _set_leaf(claimed, e["path"], True, name, fail)
            float_params = set_in(float_params, e["path"], array)
        elif e["kind"] == "batch_stat":
            batch_stats = _set_leaf(batch_stats, e["path"], floats(name, e), name, fail)
    return Artifact(meta["config"], quantized, float_params, batch_stats, meta["metrics"])


def _set_leaf(tree: dict, key_path: tuple, value, name: str, fail) -> dict:
    """`tree` with `value` at `key_path`, refusing a path that collides with another (one
    a prefix of the other, or numbered and named keys side by side)."""
    node = tree
    for depth, key in enumerate(key_path):
        if not isinstance(node, dict):
            fail(f"tensor {_show(name)} collides with another tensor's path")
        if node and any(isinstance(k, int) != isinstance(key, int) for k in node):
            fail(f"tensor {_show(name)} mixes numbered and named keys with another tensor")
        last = depth == len(key_path) - 1
        if last and key in node or not last and key in node and not isinstance(node[key], dict):
            fail(f"tensor {_show(name)} collides with another tensor's path")
        node = node.get(key, {})
    return set_in(tree, key_path, value)


# ----------------------------------------------------------------------------- sizes


def size_report(params: dict, layers: dict[str, QuantizedLayer], file_bytes: int | None = None):
    """Sizes and compression ratios, per layer and overall (see the module docstring)."""
    quantized_paths = {tuple(layer.path) for layer in layers.values()}
    total = sum(int(np.size(leaf)) for _, leaf in leaves_with_paths(params))
    float_count = sum(
        int(np.size(leaf))
        for p, leaf in leaves_with_paths(params)
        if tuple(p) not in quantized_paths
    )
    per_layer, index_bits, huffman, codebook_bits = {}, 0, 0, 0
    for name, layer in layers.items():
        idx = np.asarray(layer.indices).ravel()
        bits = bits_for(layer.k)
        coded = huffman_bits(np.bincount(idx, minlength=layer.k))
        per_layer[name] = {
            "weights": int(idx.size),
            "k": layer.k,
            "bits_per_weight": bits,
            "huffman_bits_per_weight": coded / max(idx.size, 1),
            "distinct_values": int(np.unique(np.asarray(layer.codebook)[idx]).size),
        }
        index_bits += idx.size * bits
        huffman += coded
        codebook_bits += 32 * layer.k
    compressed_bits = index_bits + codebook_bits + 32 * float_count
    report = {
        "total_params": total,
        "quantized_params": total - float_count,
        "float_params": float_count,
        "float32_bytes": 4 * total,
        "compressed_bytes": compressed_bits / 8,
        "compression_ratio": 32 * total / compressed_bits,
        "huffman_bytes": (huffman + codebook_bits + 32 * float_count) / 8,
        "huffman_compression_ratio": 32 * total / (huffman + codebook_bits + 32 * float_count),
        "layers": per_layer,
    }
    if file_bytes is not None:
        report["file_bytes"] = int(file_bytes)
    return report


def save_model(path: str | Path, q: QuantizedModel) -> int:
    """Writes a `QuantizedModel` to `path` atomically; returns the file's size in bytes."""
    if not isinstance(q, QuantizedModel):
        raise ArtifactError(
            f"save(path, q): q is a QuantizedModel (what qj.quantize or qj.tune returns), got "
            f"{type(q).__name__}"
        )
    return save(
        path,
        config=q.config,
        params=jax.device_get(q.params),
        batch_stats=jax.device_get(q.batch_stats),
        layers={name: jax.device_get(layer) for name, layer in q.layers.items()},
        metadata=to_python(q.metadata),
    )


def load_model(path: str | Path, into=None) -> QuantizedModel:
    """Reads a model file into a `QuantizedModel` (refusing a damaged or crafted file with
    one ArtifactError line); with `into` (an NNX model of the same structure), also writes
    the weights and statistics into it."""
    q = load(path).to_model()
    if into is not None:
        q.into(into)
    return q
