"""Fuzz the control socket's request side: IPCServer._serve on any bytes.

Property: `_serve` never raises; the client gets exactly one JSON object line
(with "ok") or a closed connection; a client that goes away mid-answer costs
nothing; and the same server answers a valid `status` request afterwards.
In memory: a StreamReader fed the bytes and a writer that collects them.
"""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from hypothesis import example, given, strategies as st

from supervisor import ipc

LIMIT = 64 << 10  # ipc.MAX_REQUEST: the request size the server takes


class Writer:
    def __init__(self, broken: bool = False):
        self.out = b""
        self.broken = broken  # the client left: every write fails like a reset socket
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.broken:
            raise ConnectionResetError("client gone")
        self.out += data

    async def drain(self) -> None:
        if self.broken:
            raise BrokenPipeError("client gone")

    def close(self) -> None:
        self.closed = True
        for end in getattr(self, "_pair", ()):
            end.close()

    def get_extra_info(self, name: str, default=None):
        """The connection's socket, as asyncio's writer gives it: one end of a real
        socketpair, whose peer (SO_PEERCRED) is this process's own user."""
        if name != "socket":
            return default
        here, there = socket.socketpair(socket.AF_UNIX)
        self._pair = (here, there)
        return here


async def _status(req):
    return {"ok": True, "cmd": req["cmd"]}


async def _strict(req):  # a handler that trusts its arguments: a bug must cost one answer
    return {"ok": True, "n": int(req["n"]) + len(req["name"])}


def _serve(server: ipc.IPCServer, data: bytes, eof: bool, broken: bool = False) -> Writer:
    async def go() -> Writer:
        reader = asyncio.StreamReader(limit=LIMIT)  # as start() makes them
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        writer = Writer(broken)
        await server._serve(reader, writer)
        return writer
    return asyncio.run(go())


_json_ish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_requests = st.one_of(
    st.binary(max_size=2000),
    st.dictionaries(st.sampled_from(["cmd", "name", "n", "x"]), _json_ish, max_size=4)
      .map(lambda d: json.dumps(d).encode() + b"\n"),
    st.fixed_dictionaries({"cmd": st.sampled_from(["status", "strict", "stop", "", "STATUS"])},
                          optional={"name": _json_ish, "n": _json_ish})
      .map(lambda d: json.dumps(d).encode() + b"\n"),
    st.builds(lambda head, n, tail: head + b"x" * n + tail, st.binary(max_size=50),
              st.integers(LIMIT - 100, 3 * LIMIT), st.binary(max_size=50)),
    st.builds(lambda n: b"[" * n + b"\n", st.integers(1, 100000)),
)


@given(data=_requests, eof=st.booleans(), broken=st.booleans())
@example(data=b"x" * (2 << 20) + b"\n", eof=True, broken=False)   # the reported 1 MiB+ request
@example(data=b'{"cmd": "status"' + b" " * (1 << 20) + b"}\n", eof=True, broken=False)
@example(data=b"\xff\xfe\xfd\n", eof=True, broken=False)
@example(data=b"", eof=True, broken=False)
@example(data=b'{"cmd": "sta', eof=False, broken=False)          # a client that hangs mid-line
@example(data=b'{"cmd": "strict", "n": "x"}\n', eof=True, broken=False)
@example(data=b'{"cmd": "status"}\n', eof=True, broken=True)
def test_any_request_costs_one_connection(data: bytes, eof: bool, broken: bool) -> None:
    server = ipc.IPCServer(Path("/nonexistent"),
                           {"status": _status, "strict": _strict})
    server.request_timeout = 0.01  # a request with neither newline nor EOF waits this long

    w = _serve(server, data, eof, broken)

    assert w.closed
    if w.out:
        assert w.out.endswith(b"\n") and w.out.count(b"\n") == 1
        answer = json.loads(w.out)
        assert isinstance(answer, dict) and isinstance(answer["ok"], bool)
        if not answer["ok"]:
            assert isinstance(answer["error"], str) and "\n" not in answer["error"]
            assert len(answer["error"]) < 200
    else:  # silence only for a client that sent nothing at all, or left
        assert broken or (data == b"" and eof)
    after = _serve(server, b'{"cmd": "status"}\n', eof=False)
    assert json.loads(after.out) == {"ok": True, "cmd": "status"}
