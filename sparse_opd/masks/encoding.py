"""Compact, self-describing encodings of sorted unique flat indices.

A weight of ``numel`` entries with ``k`` selected coordinates is stored as one ``uint8`` tensor whose first byte names
the encoding, chosen per module as the smallest of:

- ``GAPS`` (1): LEB128 varints of the gaps between consecutive indices (the first gap is the first index). About
  one byte per coordinate when the mean gap is below 128, i.e. density above ~1%.
- ``BITMAP`` (2): one bit per weight entry, little-endian bit order. ``numel / 8`` bytes; wins above 1/8 density.
- ``INT32`` (3): little-endian int32 flat indices. Four bytes per coordinate; a bound for the other two.

Decoding needs ``numel`` (bitmap) and is validated: the result is sorted, unique and inside ``[0, numel)``.
"""

from __future__ import annotations

import numpy as np
import torch

GAPS, BITMAP, INT32 = 1, 2, 3
ENCODING_NAMES = {GAPS: "gaps", BITMAP: "bitmap", INT32: "int32"}


class IndexEncodingError(ValueError):
    """An index stream is truncated, foreign or inconsistent with the weight it describes."""


def validate_flat_indices(indices: torch.Tensor, numel: int, name: str = "indices") -> torch.Tensor:
    """Return ``indices`` as sorted int64 after checking they are 1-D, unique and inside ``[0, numel)``."""
    if indices.dtype in (torch.bool, torch.uint8) or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"{name}: flat indices must be an integer tensor, got {indices.dtype}")
    indices = indices.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if indices.numel() == 0:
        raise ValueError(f"{name}: the mask selects no coordinate; give it at least one index or drop the module")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        indices = torch.sort(indices).values  # already-sorted input is returned as is, sharing its storage
    if indices[0] < 0 or indices[-1] >= numel:
        raise ValueError(
            f"{name}: indices must lie in [0, {numel}) for a weight of {numel} entries, "
            f"got a range of [{int(indices[0])}, {int(indices[-1])}]"
        )
    if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
        n_dup = int((indices[1:] == indices[:-1]).sum())
        raise ValueError(f"{name}: {n_dup} duplicated indices; each coordinate may appear once")
    return indices


def varint_length(value: int) -> int:
    """Bytes of the LEB128 varint of ``value``."""
    return max(1, -(-int(value).bit_length() // 7))


def max_stream_bytes(numel: int, k: int) -> int:
    """The largest stream any encoding can write for ``k`` coordinates of a weight of ``numel`` entries: a bound to
    check a claimed or stored stream size against before allocating or decoding anything."""
    return 1 + max((numel + 7) // 8, 4 * k, k * varint_length(max(numel - 1, 0)))


def _varint_encode(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.uint64)
    n_bytes = np.ones(values.shape, dtype=np.int64)
    v = values >> np.uint64(7)
    while v.any():
        n_bytes += v > 0
        v >>= np.uint64(7)
    out = np.empty(int(n_bytes.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(n_bytes)[:-1]))
    for byte_pos in range(int(n_bytes.max())):
        sel = n_bytes > byte_pos
        chunk = (values[sel] >> np.uint64(7 * byte_pos)) & np.uint64(0x7F)
        more = (n_bytes[sel] > byte_pos + 1).astype(np.uint8) << 7
        out[starts[sel] + byte_pos] = chunk.astype(np.uint8) | more
    return out


def _varint_decode(stream: np.ndarray) -> np.ndarray:
    if stream.size == 0:
        return np.zeros(0, dtype=np.int64)
    if stream[-1] & 0x80:
        raise IndexEncodingError("gap stream ends inside a varint (truncated file?)")
    ends = np.flatnonzero((stream & 0x80) == 0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    pos = np.arange(stream.size) - starts[group]
    if pos.max() > 8:
        raise IndexEncodingError("gap stream holds a varint longer than 9 bytes (foreign data?)")
    contrib = (stream & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(contrib, starts).astype(np.int64)


def _varint_bytes(values: np.ndarray) -> int:
    """Total bytes of the LEB128 varints of ``values`` (non-negative), without encoding them."""
    lengths = np.ones(values.shape, dtype=np.int64)
    v = values.astype(np.uint64) >> np.uint64(7)
    while v.any():
        lengths += v > 0
        v >>= np.uint64(7)
    return int(lengths.sum())


def _bitmap(idx: np.ndarray, numel: int) -> np.ndarray:
    """Little-endian bitmap of ``idx`` in ``ceil(numel / 8)`` bytes (never a byte per entry)."""
    out = np.zeros((numel + 7) // 8, dtype=np.uint8)
    np.bitwise_or.at(out, idx >> 3, (1 << (idx & 7)).astype(np.uint8))
    return out


def encode_indices(indices: torch.Tensor, numel: int, encoding: str = "auto") -> torch.Tensor:
    """Encode sorted unique flat ``indices`` of a weight with ``numel`` entries into a ``uint8`` stream.

    ``encoding`` is ``"auto"`` (smallest of the three), ``"gaps"``, ``"bitmap"`` or ``"int32"``. Sizes are computed
    first and only the chosen stream is built, so a huge weight with few coordinates costs no bitmap.
    """
    if encoding not in ("auto", "gaps", "bitmap", "int32"):
        raise ValueError(f"unknown index encoding {encoding!r}; use 'auto', 'gaps', 'bitmap' or 'int32'")
    idx = validate_flat_indices(indices, numel).numpy()
    gaps = np.diff(idx, prepend=0)
    sizes = {}
    if encoding in ("auto", "gaps"):
        sizes[GAPS] = _varint_bytes(gaps)
    if encoding in ("auto", "bitmap"):
        sizes[BITMAP] = (numel + 7) // 8
    if encoding in ("auto", "int32"):
        if numel <= np.iinfo(np.int32).max:
            sizes[INT32] = 4 * idx.size
        elif encoding == "int32":
            raise ValueError(f"int32 encoding cannot hold indices of a weight with {numel} entries")
    code = min(sizes, key=lambda c: (sizes[c], c))
    if code == GAPS:
        payload = _varint_encode(gaps)
    elif code == BITMAP:
        payload = _bitmap(idx, numel)
    else:
        payload = idx.astype("<i4").view(np.uint8)
    return torch.from_numpy(np.concatenate(([code], payload)).astype(np.uint8))


def decode_indices(stream: torch.Tensor, numel: int, name: str = "indices") -> torch.Tensor:
    """Decode a stream written by :func:`encode_indices` into sorted int64 flat indices, validating them."""
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() == 0:
        raise IndexEncodingError(
            f"{name}: expected a non-empty 1-D uint8 index stream, got dtype={stream.dtype} "
            f"shape={tuple(stream.shape)} (is this file written by sparse_opd?)"
        )
    raw = stream.cpu().numpy()
    code, payload = int(raw[0]), raw[1:]
    if code == GAPS:
        try:
            idx = np.cumsum(_varint_decode(payload))
        except IndexEncodingError as err:
            raise IndexEncodingError(f"{name}: {err}") from None
    elif code == BITMAP:
        expected = (numel + 7) // 8
        if payload.size != expected:
            raise IndexEncodingError(
                f"{name}: bitmap has {payload.size} bytes but a weight of {numel} entries needs {expected}"
            )
        idx = np.flatnonzero(np.unpackbits(payload, bitorder="little")[:numel])
    elif code == INT32:
        if payload.size % 4:
            raise IndexEncodingError(f"{name}: int32 index stream has {payload.size} bytes, not a multiple of 4")
        idx = payload.view("<i4").astype(np.int64)
    else:
        raise IndexEncodingError(f"{name}: unknown index encoding code {code} (foreign or corrupted file)")
    idx_t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    if idx_t.numel() > 1 and not bool((idx_t[1:] > idx_t[:-1]).all()):
        raise IndexEncodingError(f"{name}: decoded indices are not strictly increasing (corrupted file)")
    try:
        return validate_flat_indices(idx_t, numel, name)
    except ValueError as err:
        raise IndexEncodingError(str(err)) from None


def encoding_name(stream: torch.Tensor) -> str:
    """Name of the encoding used by a stream (``"gaps"``, ``"bitmap"`` or ``"int32"``)."""
    return ENCODING_NAMES.get(int(stream[0]), "unknown")
