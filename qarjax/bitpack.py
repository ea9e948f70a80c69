"""Indices packed at `bits` bits each, as bit planes, with O(n) bytes of working memory.

Layout of ``pack_bits(indices, bits)`` for n indices (flattened in row-major order): `bits`
planes back to back, each ``ceil(n / 8)`` bytes; plane j (j = 0 the least significant bit)
holds bit j of every index, 8 indices a byte as ``np.packbits`` packs them (the first index in
the byte's most significant bit), the last byte padded with zero bits. So, with numpy alone::

    planes = np.unpackbits(packed.reshape(bits, -1), axis=1, count=n)   # (bits, n) of 0/1
    indices = sum(planes[j].astype(np.uint32) << j for j in range(bits))

The size is ``bits * ceil(n / 8)`` bytes: at most `bits` bytes more than n * bits / 8. Both
directions work on chunks of `CHUNK` indices, so besides their input and output they hold a
few arrays of `CHUNK` elements, never an (n, bits) array.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 18  # indices per step; a multiple of 8 so that chunks start on whole bytes


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` indices packed at `bits` bits each."""
    return bits * -(-count // 8)


def index_dtype(bits: int) -> np.dtype:
    """The smallest unsigned dtype holding `bits`-bit indices (what `unpack_bits` returns)."""
    return np.dtype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


def pack_bits(indices, bits: int) -> np.ndarray:
    """Packs non-negative integers < 2**bits as bit planes (the module docstring's layout).

    Returns a uint8 array of `packed_size(n, bits)` bytes.
    """
    flat = np.asarray(indices).reshape(-1)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"indices must be in [0, 2**{bits})")
    n = flat.size
    out = np.zeros((bits, -(-n // 8)), np.uint8)
    for start in range(0, n, CHUNK):
        chunk = flat[start : start + CHUNK].astype(np.uint32)
        lo, hi = start // 8, -(-(start + chunk.size) // 8)
        for j in range(bits):
            out[j, lo:hi] = np.packbits(((chunk >> j) & 1).astype(np.uint8))
    return out.reshape(-1)


def unpack_bits(packed, bits: int, count: int) -> np.ndarray:
    """The `count` indices of `packed` (bytes or a uint8 array in `pack_bits`' layout), as
    `index_dtype(bits)`."""
    data = np.frombuffer(packed, np.uint8) if isinstance(packed, bytes | bytearray) else packed
    data = np.asarray(data, np.uint8).reshape(-1)
    if data.size != packed_size(count, bits):
        raise ValueError(f"{data.size} bytes do not hold {count} indices as {bits} bit planes")
    planes = data.reshape(bits, -1)
    dtype = index_dtype(bits)
    out = np.zeros(count, dtype)
    for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        acc = out[start:stop]  # a view: filled in place
        for j in range(bits):
            plane = np.unpackbits(planes[j, start // 8 : -(-stop // 8)], count=stop - start)
            if dtype != np.uint8:
                plane = plane.astype(dtype)
            plane <<= j
            acc |= plane
    return out


def padding_is_zero(packed: np.ndarray, bits: int, count: int) -> bool:
    """Whether the pad bits after the last index of every plane are zero (as packed)."""
    spare = -count % 8
    if spare == 0 or count == 0:
        return True
    last = np.asarray(packed, np.uint8).reshape(bits, -1)[:, -1]
    return not np.any(last & np.uint8((1 << spare) - 1))
