"""The map stream's message framing: `u32le length | zstd frame` (facts §2.2).

tailscaled always zstd-decodes map messages, but a frame made only of raw
(stored) blocks is valid zstd, so no compressor is needed: netmaps for a few
dozen nodes are small and travel over loopback. `decode` reads raw and RLE
blocks back (tests and the benchmark client use it).
"""
from __future__ import annotations

import struct

MAGIC = b"\x28\xb5\x2f\xfd"
MAX_BLOCK = 128 * 1024  # Block_Maximum_Size
MAX_MESSAGE = 4 << 20  # more than any netmap we send; guards readers against garbage
MAX_CONTENT = MAX_MESSAGE  # decoded size; RLE blocks would otherwise expand 32768-fold


class FrameError(ValueError):
    """Bytes that are not a zstd frame this module can read."""


def encode(data: bytes) -> bytes:
    """One single-segment zstd frame of raw blocks, with the content size."""
    out = [MAGIC, bytes([0xA0]), struct.pack("<I", len(data))]  # FCS 4 bytes, single segment
    blocks = [data[i:i + MAX_BLOCK] for i in range(0, len(data), MAX_BLOCK)] or [b""]
    for i, block in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        out.append(struct.pack("<I", last | (len(block) << 3))[:3] + block)
    return b"".join(out)


def decode(frame: bytes) -> bytes:
    """The content (at most MAX_CONTENT bytes) of a zstd frame made of raw and RLE
    blocks; FrameError for anything else."""
    if frame[:4] != MAGIC:
        raise FrameError("magic number mismatch")
    if len(frame) < 5:
        raise FrameError("truncated frame header")
    fhd = frame[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if len(frame) < pos + fcs_len:
        raise FrameError("truncated frame header")
    size = int.from_bytes(frame[pos:pos + fcs_len], "little") if fcs_len else None
    if fcs_len == 2 and size is not None:
        size += 256
    pos += fcs_len
    out = bytearray()
    while True:
        if len(frame) < pos + 3:
            raise FrameError("truncated block header")
        header = int.from_bytes(frame[pos:pos + 3], "little")
        pos += 3
        last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
        if bsize > MAX_BLOCK:
            raise FrameError(f"block of {bsize} bytes exceeds {MAX_BLOCK}")
        if btype == 0:
            if len(frame) < pos + bsize:
                raise FrameError("truncated block")
            out += frame[pos:pos + bsize]
            pos += bsize
        elif btype == 1:
            if len(frame) < pos + 1:
                raise FrameError("truncated block")
            out += frame[pos:pos + 1] * bsize
            pos += 1
        else:
            raise FrameError("compressed blocks are not supported")
        if len(out) > MAX_CONTENT:
            raise FrameError(f"content exceeds {MAX_CONTENT} bytes")
        if last:
            break
    pos += 4 * checksum
    if pos != len(frame):
        raise FrameError(f"{len(frame) - pos} bytes after the frame")
    if size is not None and size != len(out):
        raise FrameError(f"content is {len(out)} bytes, header says {size}")
    return bytes(out)


def message(data: bytes) -> bytes:
    """One map-stream message: length prefix and frame."""
    frame = encode(data)
    return struct.pack("<I", len(frame)) + frame


def split_messages(buf: bytes) -> tuple[list[bytes], bytes]:
    """Decode every complete message in `buf`: (contents, the incomplete rest)."""
    out = []
    while len(buf) >= 4:
        n = struct.unpack("<I", buf[:4])[0]
        if n > MAX_MESSAGE:
            raise FrameError(f"message of {n} bytes exceeds {MAX_MESSAGE}")
        if len(buf) < 4 + n:
            break
        out.append(decode(buf[4:4 + n]))
        buf = buf[4 + n:]
    return out, buf
