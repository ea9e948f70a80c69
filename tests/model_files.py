"""Crafting compressed model files for the refusal tests: split a good file into its
metadata and tensors, change them, and write them back with fresh offsets and checksum."""

from __future__ import annotations

import hashlib
import json
import struct


def split(blob: bytes) -> tuple[dict, dict]:
    """(metadata with config/layers/metrics parsed, {name: [dtype, shape, raw bytes]})."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    meta = header.pop("__metadata__")
    for key in ("config", "layers", "metrics"):
        meta[key] = json.loads(meta[key])
    tensors = {
        name: [e["dtype"], e["shape"], data[e["data_offsets"][0] : e["data_offsets"][1]]]
        for name, e in sorted(header.items(), key=lambda ne: ne[1]["data_offsets"])
    }
    return meta, tensors


def header_of(meta: dict, tensors: dict) -> tuple[dict, bytes]:
    """The header (tensors laid out back to back, checksum of their bytes) and the data."""
    data = b"".join(raw for _, _, raw in tensors.values())
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    meta = dict(meta)
    for key in ("config", "layers", "metrics"):
        if not isinstance(meta.get(key, ""), str):
            meta[key] = json.dumps(meta[key])
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return {"__metadata__": meta, **header}, data


def file_of(header, data: bytes) -> bytes:
    """A file of any JSON-ready header (or raw header bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def build(meta: dict, tensors: dict) -> bytes:
    return file_of(*header_of(meta, tensors))
