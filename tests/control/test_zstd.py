"""supervisor.control.zstdframe: raw-block zstd frames and the map stream's
`u32le length | frame` messages."""
from __future__ import annotations

import struct

import pytest

from supervisor.control.zstdframe import (
    MAGIC,
    MAX_BLOCK,
    MAX_MESSAGE,
    FrameError,
    decode,
    encode,
    message,
    split_messages,
)

KIB = 1024


def payload(n: int) -> bytes:
    return bytes((i * 7 + i // 256) % 256 for i in range(n))


def blocks(frame: bytes) -> list[tuple[int, int, int]]:
    """(last, type, size) of each block of a frame with our 6-byte header."""
    out, pos = [], 4 + 1 + 4
    while pos < len(frame):
        h = int.from_bytes(frame[pos:pos + 3], "little")
        last, btype, size = h & 1, (h >> 1) & 3, h >> 3
        out.append((last, btype, size))
        pos += 3 + (size if btype == 0 else 1)
    assert pos == len(frame)
    return out


@pytest.mark.parametrize("n", [0, 10, 128 * KIB, 300 * KIB])
def test_round_trip(n):
    data = payload(n)
    frame = encode(data)
    assert decode(frame) == data


@pytest.mark.parametrize("n", [0, 10, 128 * KIB, 300 * KIB])
def test_frame_header(n):
    frame = encode(payload(n))
    assert frame[:4] == MAGIC == b"\x28\xb5\x2f\xfd"
    assert frame[4] == 0xA0  # FCS field 4 bytes, single segment, no checksum, no dict
    assert struct.unpack("<I", frame[5:9])[0] == n


@pytest.mark.parametrize("n, sizes", [
    (0, [0]),
    (10, [10]),
    (128 * KIB, [MAX_BLOCK]),
    (300 * KIB, [MAX_BLOCK, MAX_BLOCK, 300 * KIB - 2 * MAX_BLOCK]),
])
def test_raw_blocks_last_bit_only_on_final(n, sizes):
    bl = blocks(encode(payload(n)))
    assert [size for _, _, size in bl] == sizes
    assert all(btype == 0 for _, btype, _ in bl)  # raw blocks
    assert [last for last, _, _ in bl] == [0] * (len(sizes) - 1) + [1]


def test_empty_frame_exact_bytes():
    assert encode(b"") == MAGIC + b"\xa0" + bytes(4) + b"\x01\x00\x00"


def test_decode_rle_block():
    # FHD 0x20: single segment, 1-byte FCS; one last RLE block of 5 x 'z'.
    header = (5 << 3) | (1 << 1) | 1
    frame = MAGIC + b"\x20\x05" + header.to_bytes(3, "little") + b"z"
    assert decode(frame) == b"zzzzz"


def test_split_messages_several_and_partial_tail():
    datas = [b"", b"first", payload(200 * KIB), b"last"]
    stream = b"".join(message(d) for d in datas)
    tail = message(b"incomplete")[:-3]
    out, rest = split_messages(stream + tail)
    assert out == datas
    assert rest == tail
    # Feeding the remainder completes the last message.
    out, rest = split_messages(rest + message(b"incomplete")[-3:])
    assert out == [b"incomplete"] and rest == b""


def test_split_messages_short_prefix_is_rest():
    assert split_messages(b"\x05\x00") == ([], b"\x05\x00")


def test_message_layout():
    m = message(b"abc")
    assert struct.unpack("<I", m[:4])[0] == len(m) - 4
    assert m[4:] == encode(b"abc")


def test_garbage_magic():
    with pytest.raises(FrameError, match="magic"):
        decode(b"\x00\x01\x02\x03" + encode(b"x")[4:])
    with pytest.raises(FrameError, match="magic"):
        split_messages(struct.pack("<I", 12) + b"not zstd abc")


@pytest.mark.parametrize("cut", [4, 7, 9, 11, 12, 20])
def test_truncated_frame(cut):
    frame = encode(b"0123456789abcdef")  # 9 header + 3 block header + 16
    with pytest.raises(FrameError, match="truncated"):
        decode(frame[:cut])


def test_message_length_above_max():
    with pytest.raises(FrameError, match="exceeds"):
        split_messages(struct.pack("<I", MAX_MESSAGE + 1))
    # At the limit, an incomplete body is just waited for.
    buf = struct.pack("<I", MAX_MESSAGE) + MAGIC
    assert split_messages(buf) == ([], buf)


def test_trailing_bytes():
    with pytest.raises(FrameError, match="1 bytes after the frame"):
        decode(encode(b"abc") + b"\x00")
    frame = encode(b"abc") + b"xy"
    with pytest.raises(FrameError, match="after the frame"):
        split_messages(struct.pack("<I", len(frame)) + frame)


def test_content_size_mismatch():
    frame = bytearray(encode(b"abc"))
    frame[5] = 4
    with pytest.raises(FrameError, match="header says 4"):
        decode(bytes(frame))


def test_compressed_block_unsupported():
    header = (1 << 3) | (2 << 1) | 1
    with pytest.raises(FrameError, match="compressed"):
        decode(MAGIC + b"\x20\x01" + header.to_bytes(3, "little") + b"\x00")
