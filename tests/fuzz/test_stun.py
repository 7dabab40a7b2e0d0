"""STUN datagrams (stun.py): anyone on loopback can send the responder anything.

Property: parse_binding_request never raises and accepts only well-formed
binding requests (its answer is their transaction id); the live responder
answers nothing else, lets no exception reach asyncio's handler, and keeps
answering a real request (tailscaled's) after every datagram.
"""
from __future__ import annotations

import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.control import stun
from tests.control.live_server import LiveControl
from tests.control.test_stun import parse_response, tailscale_request

TXID = bytes(range(12))
VALID = tailscale_request(TXID)


def _with_length(b: bytes, n: int) -> bytes:
    return b[:2] + struct.pack(">H", n & 0xFFFF) + b[4:]


DATAGRAMS = st.one_of(
    st.binary(max_size=80),
    st.binary(max_size=60).map(lambda b: b"\x00\x01" + struct.pack(">H", len(b)) + stun.MAGIC_COOKIE + TXID + b),
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)).map(
        lambda t: VALID[:t[0]] + bytes([VALID[t[0]] ^ t[1]]) + VALID[t[0] + 1:]),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    st.integers(0, 0xFFFF).map(lambda n: _with_length(VALID, n)),
)


@given(DATAGRAMS)
@example(_with_length(VALID, 0)).via("length field 0")
@example(_with_length(VALID, 0xFFFF)).via("length field 2^16-1")
@example(VALID + b"\x00\x00\x00\x00").via("a valid request followed by garbage")
@example(VALID[:20]).via("the header alone, length still announcing attributes")
def test_any_datagram_parses_to_a_txid_or_none(data: bytes) -> None:
    txid = stun.parse_binding_request(data)
    if txid is not None:
        assert txid == data[8:20] and data[:2] == b"\x00\x01" and data[4:8] == stun.MAGIC_COOKIE
        assert struct.unpack(">H", data[2:4])[0] == len(data) - 20


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LiveControl, socket.socket]]:
    with tempfile.TemporaryDirectory() as d, LiveControl(Path(d) / "control") as lc, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        yield lc, s


def answer_to(s: socket.socket, port: int, txid: bytes) -> tuple[bytes, str, int]:
    """Send tailscaled's request and return the parsed answer to it (answers to
    earlier fuzz datagrams, if any slipped through, are skipped)."""
    s.sendto(tailscale_request(txid), ("127.0.0.1", port))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = parse_response(s.recv(2048))
        if got[0] == txid:
            return got
    raise AssertionError("no answer to a valid request")


@settings(max_examples=100)
@given(DATAGRAMS, st.binary(min_size=12, max_size=12))
def test_any_datagram_leaves_the_responder_answering(live: Any, data: bytes, txid: bytes) -> None:
    lc, s = live
    lc.clear()
    port = lc.srv.stun.port
    s.sendto(data, ("127.0.0.1", port))
    got_txid, host, got_port = answer_to(s, port, txid)
    assert (host, got_port) == s.getsockname()
    lc.assert_healthy()
