"""The compressed model file: bit-packed indices, codebooks, float leftovers, a checksum.

File layout (little-endian), self-describing and safe to open (no pickle, nothing executed)::

    b"QARJAX\\x00\\x01"            magic and format version
    uint64 header_length
    header                         UTF-8 JSON: config, and for every array its name, kind,
                                   dtype, shape, byte offset and length (and bits, K)
    payload                        the arrays' raw bytes, back to back
    32 bytes                       SHA-256 of everything before it

Quantized kernels are stored as codebook (K float32) + indices packed at ceil(log2 K) bits
each; every other parameter and the batch statistics as float32. Loading verifies the
checksum first, so a truncated or altered file is refused, and rebuilds exactly the
dequantized parameters that were saved.

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
import struct
from pathlib import Path

import numpy as np

from qarjax.errors import ArtifactError
from qarjax.quantize import QuantizedLayer
from qarjax.trees import Path as KeyPath
from qarjax.trees import leaves_with_paths, path_name, set_in

MAGIC = b"QARJAX\x00\x01"


def bits_for(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def pack_bits(indices: np.ndarray, bits: int) -> bytes:
    """Packs non-negative integers < 2**bits at `bits` bits each (MSB first)."""
    flat = np.asarray(indices, np.uint32).ravel()
    planes = (flat[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).ravel()).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8))[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint32)
    return (planes.astype(np.uint32) * weights).sum(axis=1).astype(np.int32)


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
    """A loaded compressed model: its config, quantized layers, float params and stats."""

    config: dict
    layers: dict[str, QuantizedLayer]
    float_params: dict  # nested dict of the unquantized params
    batch_stats: dict
    metadata: dict

    def params(self) -> dict:
        """The dequantized params tree (quantized kernels rebuilt from their codebooks)."""
        tree = self.float_params
        for layer in self.layers.values():
            tree = set_in(tree, layer.path, np.asarray(layer.codebook)[np.asarray(layer.indices)])
        return tree


def _encode_path(path: KeyPath) -> list:
    return [k if isinstance(k, int) else str(k) for k in path]


def save(
    path: str | Path,
    *,
    config: dict,
    params: dict,
    batch_stats: dict,
    layers: dict[str, QuantizedLayer],
    metadata: dict | None = None,
) -> int:
    """Writes a compressed model atomically; returns its size in bytes.

    Args:
      params: the full params tree; the kernels named in `layers` are stored quantized.
      batch_stats: batch-norm statistics (stored float32).
      layers: quantized kernels by name (indices + codebook).
      metadata: extra JSON-ready facts (accuracies, method...) kept in the header.
    """
    entries, chunks, offset = [], [], 0

    def add(kind, key_path, array=None, raw=None, **extra):
        nonlocal offset
        data = raw if raw is not None else np.ascontiguousarray(array, np.float32).tobytes()
        entries.append(
            {"kind": kind, "path": _encode_path(key_path), "offset": offset, "length": len(data)}
            | extra
        )
        chunks.append(data)
        offset += len(data)

    quantized_paths = {tuple(layer.path) for layer in layers.values()}
    for layer in layers.values():
        idx = np.asarray(layer.indices)
        bits = bits_for(layer.k)
        add("codebook", layer.path, np.asarray(layer.codebook), shape=[layer.k], k=layer.k)
        add("indices", layer.path, raw=pack_bits(idx, bits), shape=list(idx.shape), bits=bits)
    for key_path, leaf in leaves_with_paths(params):
        if tuple(key_path) not in quantized_paths:
            add("param", key_path, np.asarray(leaf), shape=list(np.shape(leaf)))
    for key_path, leaf in leaves_with_paths(batch_stats):
        add("batch_stat", key_path, np.asarray(leaf), shape=list(np.shape(leaf)))
    header = json.dumps(
        {"config": config, "entries": entries, "metadata": metadata or {}}, sort_keys=True
    ).encode()
    body = MAGIC + struct.pack("<Q", len(header)) + header + b"".join(chunks)
    blob = body + hashlib.sha256(body).digest()
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return len(blob)


KINDS = ("codebook", "indices", "param", "batch_stat")
MAX_RANK = 8
MAX_HEADER_BYTES = 64 << 20


def load(path: str | Path) -> Artifact:
    """Reads and verifies a compressed model.

    Nothing in the file is executed, and every header field is checked before it is used
    (types, kinds, shapes, offsets and lengths against the payload, bits in 1..16, K in
    [2, 65536], indices < K, finite values, no duplicate or missing entries), so a truncated,
    altered or crafted file is refused with one ArtifactError line, never a crash.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"compressed model not found: {path}")
    blob = path.read_bytes()
    if len(blob) < len(MAGIC) + 8 + 32 or not blob.startswith(MAGIC):
        raise ArtifactError(f"{path} is not a qarjax compressed model (bad magic or too short)")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ArtifactError(f"{path} is truncated or altered: checksum mismatch")
    (header_length,) = struct.unpack("<Q", body[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if header_length > min(len(body) - start, MAX_HEADER_BYTES):
        raise ArtifactError(f"{path}: header length {header_length} runs past the file")
    try:
        header = json.loads(body[start : start + header_length])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path} has a corrupt header: {type(e).__name__}") from None
    payload = memoryview(body)[start + header_length :]
    return _parse(path, header, payload)


def _parse(path: Path, header, payload: memoryview) -> Artifact:
    def fail(what: str):
        raise ArtifactError(f"{path}: {what}")

    if not isinstance(header, dict):
        fail(f"the header is a JSON {type(header).__name__}, not an object")
    missing = {"config", "entries", "metadata"} - header.keys()
    if missing:
        fail(f"the header lacks {', '.join(sorted(missing))}")
    if not isinstance(header["config"], dict) or not isinstance(header["metadata"], dict):
        fail("the header's config and metadata must be JSON objects")
    if not isinstance(header["entries"], list):
        fail("the header's entries must be a list")
    codebooks, indices, float_params, batch_stats, seen = {}, {}, {}, {}, set()
    for i, e in enumerate(header["entries"]):
        key_path, count = _check_entry(e, i, len(payload), fail)
        name = path_name(key_path)
        if (e["kind"], key_path) in seen:
            fail(f"entry {name} ({e['kind']}) appears twice")
        seen.add((e["kind"], key_path))
        raw = payload[e["offset"] : e["offset"] + e["length"]]
        if e["kind"] == "indices":
            bits = e.get("bits")
            if not (_is_int(bits) and 1 <= bits <= 16):
                fail(f"indices of {name}: bits must be an integer in [1, 16], got {bits!r}")
            if e["length"] != -(-count * bits // 8):
                fail(f"indices of {name}: {e['length']} bytes do not hold {count} x {bits} bits")
            indices[key_path] = unpack_bits(raw, bits, count).reshape(e["shape"])
            continue
        if e["length"] != 4 * count:
            fail(f"entry {name}: {e['length']} bytes do not hold {count} float32 values")
        array = np.frombuffer(raw, np.float32).reshape(e["shape"]).copy()
        if not np.all(np.isfinite(array)):
            fail(f"entry {name} ({e['kind']}) holds non-finite values")
        if e["kind"] == "codebook":
            k = e.get("k")
            if not (_is_int(k) and 2 <= k <= 65536 and e["shape"] == [k]):
                fail(f"codebook of {name}: K must be an integer in [2, 65536] matching its shape")
            codebooks[key_path] = array
        elif e["kind"] == "param":
            float_params = _set_leaf(float_params, key_path, array, fail)
        else:
            batch_stats = _set_leaf(batch_stats, key_path, array, fail)
    if codebooks.keys() != indices.keys():
        odd = sorted(path_name(p) for p in codebooks.keys() ^ indices.keys())
        fail(f"layers without both a codebook and indices: {', '.join(odd[:4])}")
    quantized = {}
    for p, idx in sorted(indices.items(), key=str):
        k = codebooks[p].shape[0]
        if idx.size and int(idx.max()) >= k:
            fail(f"indices of {path_name(p)} reach {int(idx.max())}, its codebook has K = {k}")
        quantized[path_name(p)] = QuantizedLayer(p, idx, codebooks[p])
    for layer in quantized.values():
        node = float_params
        for key in layer.path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            fail(f"{layer.name} is stored both quantized and as a float param")
    return Artifact(header["config"], quantized, float_params, batch_stats, header["metadata"])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(e, i: int, payload_bytes: int, fail):
    """(key path, element count) of a header entry whose fields are all valid."""
    if not isinstance(e, dict):
        fail(f"entry {i} is not a JSON object")
    need = {"kind", "path", "offset", "length", "shape"} - e.keys()
    if need:
        fail(f"entry {i} lacks {', '.join(sorted(need))}")
    if e["kind"] not in KINDS:
        fail(f"entry {i} has an unknown kind {str(e['kind'])[:40]!r}")
    p = e["path"]
    if not (isinstance(p, list) and p and len(p) <= 32
            and all(isinstance(k, str) or _is_int(k) for k in p)):  # fmt: skip
        fail(f"entry {i} has a bad path (a non-empty list of names)")
    shape = e["shape"]
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK
            and all(_is_int(d) and d >= 0 for d in shape)):  # fmt: skip
        fail(f"entry {i} ({path_name(p)}) has a bad shape {str(shape)[:60]}")
    count = math.prod(shape)
    offset, length = e["offset"], e["length"]
    if not (_is_int(offset) and _is_int(length) and offset >= 0 and length >= 0):
        fail(f"entry {i} ({path_name(p)}) has a bad offset or length")
    if offset + length > payload_bytes or count > 8 * payload_bytes:
        fail(f"entry {path_name(p)} runs past the payload")
    return tuple(p), count


def _set_leaf(tree: dict, key_path: tuple, value, fail) -> dict:
    node = tree
    for key in key_path[:-1]:
        node = node.get(key, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            fail(f"entry {path_name(key_path)} collides with another entry's path")
    if key_path[-1] in node:
        fail(f"entry {path_name(key_path)} collides with another entry's path")
    return set_in(tree, key_path, value)


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
            "huffman_bits_per_weight": coded / idx.size,
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


def save_model(path: str | Path, q) -> int:
    """Writes a `QuantizedModel` to `path` atomically; returns the file's size in bytes."""
    import jax

    from qarjax.metrics import to_python

    return save(
        path,
        config=q.config,
        params=jax.device_get(q.params),
        batch_stats=jax.device_get(q.batch_stats),
        layers={name: jax.device_get(layer) for name, layer in q.layers.items()},
        metadata=to_python(q.metadata),
    )


def load_model(path: str | Path, into=None):
    """Reads a model file into a `QuantizedModel` (refusing a damaged or crafted file with
    one ArtifactError line); with `into` (an NNX model of the same structure), also writes
    the weights and statistics into it."""
    from qarjax.quantize import QuantizedModel

    a = load(path)
    q = QuantizedModel(a.params(), a.batch_stats, a.layers, a.config, a.metadata)
    if into is not None:
        q.into(into)
    return q
