"""Index streams: exact round trips, the smallest encoding chosen, corrupt streams rejected."""

from __future__ import annotations

import pytest
import torch

from sparse_opd.masks.encoding import IndexEncodingError, decode_indices, encode_indices, encoding_name

NUMEL = 50_000


def _random_indices(density, seed=0):
    k = max(1, int(NUMEL * density))
    return torch.sort(torch.randperm(NUMEL, generator=torch.Generator().manual_seed(seed))[:k]).values


@pytest.mark.parametrize("encoding", ["gaps", "bitmap", "int32", "auto"])
@pytest.mark.parametrize("density", [0.0001, 0.01, 0.05, 0.3, 1.0])
def test_round_trip_is_exact(encoding, density):
    idx = _random_indices(density)
    assert torch.equal(decode_indices(encode_indices(idx, NUMEL, encoding), NUMEL), idx)


def test_auto_picks_the_smallest_encoding():
    for density, expected in [(0.0001, "gaps"), (0.05, "gaps"), (0.3, "bitmap")]:
        idx = _random_indices(density)
        sizes = {e: encode_indices(idx, NUMEL, e).numel() for e in ("gaps", "bitmap", "int32")}
        stream = encode_indices(idx, NUMEL)
        assert encoding_name(stream) == expected
        assert stream.numel() == min(sizes.values())


def test_gaps_cost_about_one_byte_per_coordinate_at_five_percent():
    idx = _random_indices(0.05)
    assert encode_indices(idx, NUMEL).numel() / idx.numel() < 1.02


def test_large_gaps_use_multi_byte_varints():
    idx = torch.tensor([0, 127, 128 + 127, 40_000, 49_999])
    assert torch.equal(decode_indices(encode_indices(idx, NUMEL, "gaps"), NUMEL), idx)


@pytest.mark.parametrize(
    "stream, message",
    [
        (torch.tensor([1, 0x85], dtype=torch.uint8), "ends inside a varint"),
        (torch.tensor([2, 1, 2], dtype=torch.uint8), "bitmap has 2 bytes"),
        (torch.tensor([3, 1, 2, 3], dtype=torch.uint8), "not a multiple of 4"),
        (torch.tensor([7, 1], dtype=torch.uint8), "unknown index encoding code 7"),
        (torch.tensor([1, 5, 0], dtype=torch.uint8), "not strictly increasing"),
        (torch.tensor([1, 0x7F, 0x7F, 0x7F], dtype=torch.uint8), "must lie in"),
        (torch.tensor([1.0]), "uint8 index stream"),
    ],
)
def test_corrupt_streams_are_rejected(stream, message):
    with pytest.raises(IndexEncodingError, match=message):
        decode_indices(stream, 300)
