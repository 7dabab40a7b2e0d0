"""A small asyncio ts2021 client for tests and the benchmark: GET /key, the
`POST /ts2021` upgrade written by hand, Noise IK via supervisor.control.noise,
then HTTP/2 (prior knowledge, `h2`) inside Noise records (facts §1–2).

    async with Ts2021Client(url) as c:
        status, body = await c.post("/machine/register", register_body(nk, secret, "a"))
        ms = await c.map_stream(map_body(nk, "a"))
        msg = await ms.next_message(5)
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from typing import Any, Callable
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events

from supervisor.control import noise, zstdframe

VERSION = 133


def node_key() -> str:
    return "nodekey:" + os.urandom(32).hex()


def register_body(nk: str, secret: str | None, hostname: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"Version": VERSION, "NodeKey": nk, "OldNodeKey": "nodekey:" + "00" * 32,
                            "Hostinfo": {"Hostname": hostname}, **extra}
    if secret is not None:
        body["Auth"] = {"AuthKey": secret}
    return body


def map_body(nk: str, hostname: str, **extra: Any) -> dict[str, Any]:
    return {"Version": VERSION, "NodeKey": nk, "DiscoKey": "discokey:" + os.urandom(32).hex(),
            "Stream": True, "KeepAlive": True, "Compress": "zstd",
            "Hostinfo": {"Hostname": hostname}, **extra}


class HTTPError(Exception):
    """A non-101 answer to the upgrade (or non-200 to /key)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status, self.body = status, body


def _hostport(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


async def read_http1_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def http1(url: str, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request (the server answers with Connection: close); `url` is
    http://HOST:PORT or unix:/PATH (the control's admin socket)."""
    if url.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(url.removeprefix("unix:"))
        authority = "control"
    else:
        host, port = _hostport(url)
        reader, writer = await asyncio.open_connection(host, port)
        authority = f"{host}:{port}"
    try:
        hdrs = {"Host": authority, "Content-Length": str(len(body)), **(headers or {})}
        writer.write(f"{method} {path} HTTP/1.1\r\n".encode()
                     + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode() + b"\r\n" + body)
        status, rh = await read_http1_head(reader)
        return status, await reader.readexactly(int(rh.get("content-length", "0")))
    finally:
        writer.close()


async def server_public_key(url: str) -> bytes:
    status, body = await http1(url, "GET", f"/key?v={VERSION}")
    if status != 200:
        raise HTTPError(status, body)
    return bytes.fromhex(json.loads(body)["publicKey"].removeprefix("mkey:"))


async def upgrade(url: str, machine_private: bytes, version: int = VERSION,
                  server_public: bytes | None = None, initiation: bytes | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, noise.Session]:
    """The upgrade and the Noise handshake; HTTPError if the server does not answer 101."""
    if server_public is None:
        server_public = await server_public_key(url)
    init, hs = noise.initiate(machine_private, server_public, version)
    host, port = _hostport(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /ts2021 HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n"
                 f"Connection: upgrade\r\nUpgrade: tailscale-control-protocol\r\n"
                 f"X-Tailscale-Handshake: {base64.b64encode(initiation or init).decode()}\r\n\r\n"
                 .encode())
    status, headers = await read_http1_head(reader)
    if status != 101:
        body = await reader.read(int(headers.get("content-length", "0")) or -1)
        writer.close()
        raise HTTPError(status, body)
    return reader, writer, noise.finish(hs, await reader.readexactly(noise.RESPONSE_LEN), version)


class _Stream:
    def __init__(self) -> None:
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.data = bytearray()
        self.ended = False
        self.changed = asyncio.Event()

    def finish(self) -> None:
        self.ended = True
        if not self.status.done():
            self.status.set_exception(ConnectionError("stream ended without a response"))
        self.changed.set()

    async def body(self, timeout: float = 10) -> bytes:
        async with asyncio.timeout(timeout):
            while not self.ended:
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.data)


class MapStream:
    """A streamed map response; `next_message` decodes one `u32le | zstd` message."""

    def __init__(self, stream: _Stream, status: int) -> None:
        self._s, self.status = stream, status
        self.messages: list[dict[str, Any]] = []

    async def body(self, timeout: float = 10) -> bytes:
        return await self._s.body(timeout)

    async def next_message(self, timeout: float = 10) -> dict[str, Any] | None:
        """The next message; None once the stream has ended; TimeoutError if none arrives."""
        async with asyncio.timeout(timeout):
            while True:
                msgs, rest = zstdframe.split_messages(bytes(self._s.data))
                self._s.data[:] = rest
                self.messages += [json.loads(m) for m in msgs]
                if self.messages:
                    return self.messages.pop(0)
                if self._s.ended:
                    return None
                self._s.changed.clear()
                await self._s.changed.wait()

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10
                       ) -> dict[str, Any]:
        """Skip messages until one matches `pred` (AssertionError if the stream ends)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.next_message(timeout)
                assert msg is not None, "map stream ended"
                if pred(msg):
                    return msg


class Ts2021Client:
    def __init__(self, url: str, machine_private: bytes | None = None, version: int = VERSION) -> None:
        self.url, self.version = url, version
        self.machine_private = machine_private or noise.generate_private()
        self.machine_key = "mkey:" + noise.public_key(self.machine_private).hex()
        self._streams: dict[int, _Stream] = {}
        self._window = asyncio.Event()
        self.closed = asyncio.Event()

    async def __aenter__(self) -> "Ts2021Client":
        self.reader, self.writer, self.session = await upgrade(self.url, self.machine_private, self.version)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                       header_encoding="utf-8"))
        self.h2.initiate_connection()
        self._flush()
        self._task = asyncio.create_task(self._read_loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(noise.seal(self.session.tx, data))

    async def _read_loop(self) -> None:
        try:
            while True:
                n = noise.parse_record_header(await self.reader.readexactly(3))
                pt = self.session.rx.decrypt(await self.reader.readexactly(n))
                for ev in self.h2.receive_data(pt) if pt else []:
                    s = self._streams.get(getattr(ev, "stream_id", 0) or 0)
                    if isinstance(ev, h2.events.ResponseReceived) and s and not s.status.done():
                        s.status.set_result(int(dict(ev.headers)[":status"]))
                    elif isinstance(ev, h2.events.DataReceived) and s:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        s.data += ev.data
                        s.changed.set()
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and s:
                        s.finish()
                    elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                        self._window.set()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                self._flush()
        except (asyncio.IncompleteReadError, ConnectionError, noise.NoiseError):
            pass
        finally:
            self.closed.set()
            for s in self._streams.values():
                s.finish()

    async def _request(self, path: str, obj: Any) -> _Stream:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        sid = self.h2.get_next_available_stream_id()
        s = self._streams[sid] = _Stream()
        host, port = _hostport(self.url)
        self.h2.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                   (":authority", f"{host}:{port}"), (":path", path),
                                   ("content-type", "application/json"),
                                   ("content-length", str(len(body)))])
        while True:  # respect the server's flow-control window
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0 and body:
                self._window.clear()
                await self._window.wait()
                continue
            chunk, body = body[:window], body[window:]
            self.h2.send_data(sid, chunk, end_stream=not body)
            self._flush()
            if not body:
                return s

    async def post(self, path: str, obj: Any, timeout: float = 10) -> tuple[int, bytes]:
        """One request (obj: JSON-able, or raw bytes); (status, body)."""
        s = await self._request(path, obj)
        async with asyncio.timeout(timeout):
            status = await s.status
        return status, await s.body(timeout)

    async def map_stream(self, obj: Any, timeout: float = 10) -> MapStream:
        s = await self._request("/machine/map", obj)
        async with asyncio.timeout(timeout):
            return MapStream(s, await s.status)
