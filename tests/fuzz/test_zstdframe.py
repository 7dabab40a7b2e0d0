"""The map stream's zstd framing (zstdframe.py), as a client reads it.

Property: decode and split_messages raise nothing but FrameError, whatever the
bytes; what decode returns is bounded (MAX_CONTENT), so a small frame of RLE
blocks cannot make a reader allocate gigabytes; what encode writes decodes
back unchanged.
"""
from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from supervisor.control import zstdframe as zf

RLE_BLOCK = struct.pack("<I", (1 << 1) | (zf.MAX_BLOCK << 3))[:3] + b"A"  # 128 KiB of "A", not last
BOMB = zf.MAGIC + b"\x00\x00" + RLE_BLOCK * 400 + struct.pack("<I", 1 | (1 << 1) | (1 << 3))[:3] + b"A"


def _block(last: int, btype: int, size: int, body: bytes) -> bytes:
    return struct.pack("<I", last | (btype << 1) | (size << 3))[:3] + body


FRAMES = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda fhd, rest: zf.MAGIC + bytes([fhd]) + rest, st.integers(0, 255), st.binary(max_size=60)),
    st.builds(lambda blocks, checksum: zf.MAGIC + bytes([0x04 if checksum else 0x00, 0x00]) + b"".join(blocks)
              + (b"\x00" * 4 if checksum else b""),
              st.lists(st.builds(_block, st.integers(0, 1), st.integers(0, 3),
                                 st.one_of(st.integers(0, 40), st.sampled_from([zf.MAX_BLOCK, zf.MAX_BLOCK + 1,
                                                                                2**21 - 1])),
                                 st.binary(max_size=40)), max_size=4),
              st.booleans()),
    st.binary(max_size=100).map(lambda b: zf.encode(b)[:-1]),
    st.tuples(st.binary(max_size=50), st.binary(min_size=1, max_size=8)).map(lambda t: zf.encode(t[0]) + t[1]),
)


@given(FRAMES)
@example(BOMB).via("400 RLE blocks of 128 KiB in 1.6 KB")
@example(zf.MAGIC).via("magic only")
@example(zf.encode(b"x" * 10)[:-3]).via("truncated frame")
def test_any_frame_decodes_bounded_or_is_frame_error(frame: bytes) -> None:
    try:
        out = zf.decode(frame)
    except zf.FrameError:
        return
    assert len(out) <= zf.MAX_CONTENT


@given(st.lists(st.one_of(FRAMES, st.binary(max_size=20).map(zf.encode)), max_size=3),
       st.lists(st.sampled_from([0, 1, 5, 2**31, 2**32 - 1]), max_size=3))
@example([zf.encode(b"{}")], [2**32 - 1]).via("a valid message, then a length of 2^32-1")
def test_any_stream_splits_or_is_frame_error(frames: list[bytes], lengths: list[int]) -> None:
    buf = b"".join(struct.pack("<I", len(f)) + f for f in frames) + b"".join(struct.pack("<I", n) for n in lengths)
    try:
        messages, rest = zf.split_messages(buf)
    except zf.FrameError:
        return
    assert len(rest) <= len(buf)


@given(st.binary(max_size=zf.MAX_BLOCK * 2 + 10))
def test_encode_decodes_back(data: bytes) -> None:
    assert zf.decode(zf.encode(data)) == data
    assert zf.split_messages(zf.message(data)) == ([data], b"")
