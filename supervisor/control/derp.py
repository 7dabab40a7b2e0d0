"""A DERP relay for the embedded control, served on its HTTP port at /derp.

tailscaled reaches `Running` only with a DERP region, and peers on one host
reach each other's serve ports through it (facts §3, §7). This is a port of
the parts of Tailscale's derp/derpserver (v1.78.1 and v1.96.4 speak the same
protocol, version 2) that a normal node uses: the key handshake,
FrameServerInfo (without it tailscaled raises `no-derp-connection`),
SendPacket -> RecvPacket by public key, PeerGone, Ping/Pong, NotePreferred and
keep-alives. Mesh frames (ForwardPacket, WatchConns, ClosePeer) need a mesh
key, which this relay has none of, so they close the connection as the real
server does for a client without one.

Admission, like derpserver's --verify-clients: the ClientInfo frame is sealed
with the client's key, proving possession of it, and `admit` (the control: is
this a registered node's key?) decides at once; a refused client is closed
before any frame more. Liveness: the real server trusts an admitted client
forever; this one, when a client that declared `CanAckPings` has been silent
for a keep-alive interval, sends a Ping with the keep-alive and closes it if
it is still silent at the next one. tailscaled answers pings at once
(magicsock's derp reader, 1.78 and 1.96), so a healthy node is never cut.

Wire format: each frame is `type u8 | length u32be | payload`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from supervisor.control.limits import Summarized

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MAGIC = "DERP🔑".encode()  # 8 bytes
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10
MAX_CLIENT_INFO_LEN = 256 << 10  # the real server's limit before it trusts the client
MAX_FRAME_LEN = 1 << 20  # also the client's limit; anything bigger is garbage

KEEPALIVE_INTERVAL = 60.0  # derp.KeepAlive; the server adds up to 5 s jitter
KEEPALIVE_JITTER = 5.0
HANDSHAKE_TIMEOUT = 10.0
WRITE_TIMEOUT = 2.0  # derpserver.DefaultTCPWiteTimeout
SEND_QUEUE_DEPTH = 32  # defaultPerClientSendQueueDepth, per queue (disco and other)

DISCO_MAGIC = "TS💬".encode()  # 6 bytes
DISCO_WRAPPER_MIN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN

FAST_START_HEADER = "derp-fast-start"
PROBE_PATHS = ("/derp/probe", "/derp/latency-check")


class FrameType:
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


PEER_GONE_DISCONNECTED = 0x00
PEER_GONE_NOT_HERE = 0x01


class ProtocolError(Exception):
    """The client broke the protocol; its connection (only) is closed."""


class NotAdmitted(Exception):
    """The client proved a key that `admit` refused; its connection is closed at once."""


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", ftype, len(payload)) + payload


def looks_like_disco(pkt: bytes) -> bool:
    """disco.LooksLikeDiscoWrapper: the real server answers only these with PeerGone."""
    return len(pkt) >= DISCO_WRAPPER_MIN and pkt.startswith(DISCO_MAGIC)


def short_key(k: bytes) -> str:
    return "[" + k.hex()[:10] + "]"


@dataclass
class _TokenBucket:
    """rate.NewLimiter(rate.Every(time.Second), 3), for PeerGone(NotHere) replies."""

    rate: float = 1.0
    burst: float = 3.0
    tokens: float = 3.0
    last: float = field(default_factory=time.monotonic)

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(eq=False)
class _Conn:
    """One accepted client connection. Frames for it are queued here and
    written by its own writer task, so a slow reader only ever loses its own
    packets (bounded queues drop the oldest, like the real server)."""

    key: bytes
    writer: asyncio.StreamWriter
    name: str
    queue_depth: int = SEND_QUEUE_DEPTH
    packets: deque = field(init=False)
    disco: deque = field(init=False)
    control: deque = field(default_factory=lambda: deque(maxlen=256))
    pong: bytes | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    seen_src: set[bytes] = field(default_factory=set)
    peer_gone_limit: _TokenBucket = field(default_factory=_TokenBucket)
    preferred: bool = False
    dropped: int = 0
    can_ack_pings: bool = False  # ClientInfo.CanAckPings: it answers our pings
    last_rx: float = field(default_factory=time.monotonic)  # when it last sent a frame
    ping_sent: float | None = None  # when we last pinged it for liveness

    def __post_init__(self) -> None:
        self.packets = deque(maxlen=self.queue_depth)
        self.disco = deque(maxlen=self.queue_depth)

    def enqueue_packet(self, src: bytes, pkt: bytes) -> None:
        q = self.disco if looks_like_disco(pkt) else self.packets
        if len(q) == q.maxlen:
            self.dropped += 1  # deque drops the head: fresher packets win
        q.append((src, pkt))
        self.wake.set()

    def enqueue_control(self, data: bytes) -> None:
        self.control.append(data)
        self.wake.set()

    def take_output(self) -> bytes:
        """Everything queued, as frames ready to write (control frames first)."""
        out = []
        while self.control:
            out.append(self.control.popleft())
        if self.pong is not None:
            out.append(frame(FrameType.PONG, self.pong))
            self.pong = None
        for q in (self.disco, self.packets):
            while q:
                src, pkt = q.popleft()
                out.append(frame(FrameType.RECV_PACKET, src + pkt))
        return b"".join(out)


class DerpServer:
    """A DERP relay: one public key, clients addressed by their node keys."""

    def __init__(self, private_key: bytes | None = None, *,
                 keepalive: float = KEEPALIVE_INTERVAL,
                 queue_depth: int = SEND_QUEUE_DEPTH,
                 admit: Callable[[bytes, asyncio.StreamWriter], bool] | None = None) -> None:
        """`admit(key, writer)`: called once the client proved its 32-byte key; False
        closes the connection (None: every key is served)."""
        self.admit = admit
        self.notes = Summarized(log.warning, burst=3)  # a flood of bad clients logs a count
        self._priv = PrivateKey(private_key) if private_key is not None else PrivateKey.generate()
        self.private_key: bytes = bytes(self._priv)
        self.public_key: bytes = bytes(self._priv.public_key)
        self.keepalive = keepalive
        self.queue_depth = queue_depth
        # key -> connections in registration/activity order; the last is active
        self._clients: dict[bytes, list[_Conn]] = {}
        # key -> connections that received packets from it (for PeerGone)
        self._gone_watchers: dict[bytes, set[_Conn]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False

    # -- public API -------------------------------------------------------

    def is_connected(self, key: bytes) -> bool:
        return bool(self._clients.get(key))

    @property
    def client_count(self) -> int:
        return sum(len(v) for v in self._clients.values())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     method: str, path: str, headers: dict[str, str]) -> None:
        """Serve one `GET /derp` whose request head the front end has read;
        owns the connection until it ends, and always closes it."""
        self._writers.add(writer)
        peer = _peername(writer)
        try:
            await self._handle(reader, writer, method, path, headers, peer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away; nothing to report
        except ProtocolError as e:
            self.notes.note("protocol", f"derp: closing {peer}: {e}", "derp: closed clients for protocol errors")
        except NotAdmitted as e:
            self.notes.note("refused", f"derp: closing {peer}: {e}", "derp: closed clients with unregistered keys")
        except Exception:  # a bug here must cost one connection, not the control
            log.exception("derp: closing %s: internal error", peer)
        finally:
            self._writers.discard(writer)
            await _close(writer)

    async def close(self) -> None:
        """Close every client connection; later connections are refused."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        writers = list(self._writers)
        for w in writers:
            w.transport.abort()  # like nc.Close(): unsent frames are dropped
        for w in writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()

    # -- HTTP upgrade and handshake ---------------------------------------

    async def _handle(self, reader, writer, method, path, headers, peer) -> None:
        path = path.split("?", 1)[0]
        if path in PROBE_PATHS:  # netcheck's HTTP latency probe
            status = "200 OK" if method in ("GET", "HEAD") else "405 Method Not Allowed"
            _http_reply(writer, status, "", extra="Access-Control-Allow-Origin: *\r\n")
            return
        if self._closed:
            _http_reply(writer, "503 Service Unavailable", "DERP server closed\n")
            return
        if headers.get("upgrade", "").lower() != "derp":
            # (the websocket variant is for browsers; tailscaled never uses it)
            _http_reply(writer, "426 Upgrade Required", "DERP requires connection upgrade\n")
            return
        if headers.get(FAST_START_HEADER) != "1":
            writer.write(("HTTP/1.1 101 Switching Protocols\r\n"
                          "Upgrade: DERP\r\n"
                          "Connection: Upgrade\r\n"
                          f"Derp-Version: {PROTOCOL_VERSION}\r\n"
                          f"Derp-Public-Key: {self.public_key.hex()}\r\n\r\n").encode())
        writer.write(frame(FrameType.SERVER_KEY, MAGIC + self.public_key))
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await writer.drain()
            key, box, info = await self._recv_client_info(reader)
        if self.admit is not None and not self.admit(key, writer):
            raise NotAdmitted(f"key {short_key(key)} is not a registered node's")

        conn = _Conn(key=key, writer=writer, name=f"{peer}{short_key(key)}",
                     queue_depth=self.queue_depth, can_ack_pings=info.get("CanAckPings") is True)
        conn.enqueue_control(frame(FrameType.SERVER_INFO,
                                   bytes(box.encrypt(json.dumps({"version": PROTOCOL_VERSION}).encode()))))
        self._register(conn)
        sender = asyncio.create_task(self._send_loop(conn), name=f"derp-send {conn.name}")
        self._tasks.add(sender)
        sender.add_done_callback(self._tasks.discard)
        try:
            await self._recv_loop(reader, conn)
        finally:
            conn.closed = True
            self._unregister(conn)
            sender.cancel()  # it only ever waits on wake/drain, so this is immediate

    async def _recv_client_info(self, reader: asyncio.StreamReader) -> tuple[bytes, Box, dict]:
        """The client's key, proven by a box sealed to us; the box for the reply; the
        ClientInfo JSON object (derp.ClientInfo: version, CanAckPings, ...)."""
        ftype, flen = struct.unpack(">BI", await reader.readexactly(HEADER_LEN))
        if ftype != FrameType.CLIENT_INFO:
            raise ProtocolError(f"bad frame type 0x{ftype:X}, want client info")
        if flen < KEY_LEN + NONCE_LEN:
            raise ProtocolError("short client info")
        if flen > MAX_CLIENT_INFO_LEN:
            raise ProtocolError("long client info")
        body = await reader.readexactly(flen)
        key, sealed = body[:KEY_LEN], body[KEY_LEN:]
        try:
            box = Box(self._priv, PublicKey(key))
            info = json.loads(box.decrypt(sealed))
        except (CryptoError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
            raise ProtocolError(f"cannot open client info from {short_key(key)}: {e}") from None
        if not isinstance(info, dict):
            raise ProtocolError("client info is not a JSON object")
        return key, box, info

    # -- steady state ------------------------------------------------------

    async def _recv_loop(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        while True:
            try:
                head = await reader.readexactly(HEADER_LEN)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise ProtocolError("truncated frame header") from None
                return  # clean EOF
            ftype, flen = struct.unpack(">BI", head)
            limit = KEY_LEN + MAX_PACKET_SIZE if ftype == FrameType.SEND_PACKET else MAX_FRAME_LEN
            if flen > limit:
                raise ProtocolError(f"frame type 0x{ftype:X} length {flen} exceeds {limit}")
            payload = await reader.readexactly(flen) if flen else b""
            conn.last_rx = time.monotonic()
            self._note_activity(conn)
            if ftype == FrameType.SEND_PACKET:
                if flen < KEY_LEN:
                    raise ProtocolError("short send packet frame")
                self._route(conn, payload[:KEY_LEN], payload[KEY_LEN:])
            elif ftype == FrameType.PING:
                if flen < 8 or flen > 1000:
                    raise ProtocolError(f"bad ping length {flen}")
                if conn.pong is None:  # pinging too fast: ignore, like the real server
                    conn.pong = payload[:8]
                    conn.wake.set()
            elif ftype == FrameType.NOTE_PREFERRED:
                if flen != 1:
                    raise ProtocolError("frameNotePreferred wrong size")
                conn.preferred = payload != b"\x00"
            elif ftype in (FrameType.FORWARD_PACKET, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER):
                raise ProtocolError(f"frame type 0x{ftype:X} needs a mesh key")
            # anything else (pong, future frames) is skipped, as the real server does

    async def _send_loop(self, conn: _Conn) -> None:
        """Write queued frames; a keep-alive every interval, with a liveness ping to a
        silent client that can answer it (closed if silent through the next one)."""
        loop = asyncio.get_running_loop()
        keepalive_due = False

        def tick() -> None:
            nonlocal keepalive_due, timer
            keepalive_due = True
            conn.wake.set()
            timer = loop.call_later(self.keepalive, tick)

        timer = loop.call_later(self.keepalive + random.uniform(0, min(KEEPALIVE_JITTER, self.keepalive)),
                                tick)
        try:
            while not conn.closed:
                await conn.wake.wait()
                conn.wake.clear()
                data = conn.take_output()
                if keepalive_due:
                    data += self._keepalive(conn)
                    keepalive_due = False
                if data:
                    conn.writer.write(data)
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await conn.writer.drain()
        except TimeoutError:
            self.notes.note("stalled", f"derp: closing {conn.name}: write timed out (client not reading)",
                            "derp: closed clients not reading")
            conn.writer.transport.abort()
        except _Silent as e:
            self.notes.note("silent", f"derp: closing {conn.name}: {e}", "derp: closed silent clients")
            conn.writer.transport.abort()
        except ConnectionError:
            conn.writer.transport.abort()
        except Exception:
            log.exception("derp: closing %s: internal error in sender", conn.name)
            conn.writer.transport.abort()
        finally:
            timer.cancel()

    def _keepalive(self, conn: _Conn) -> bytes:
        """The frames of one keep-alive tick; _Silent if a liveness ping went unanswered."""
        now = time.monotonic()
        if not conn.can_ack_pings:
            return frame(FrameType.KEEP_ALIVE)
        if conn.ping_sent is not None and conn.last_rx < conn.ping_sent:
            raise _Silent(f"silent for {now - conn.last_rx:.0f} s and did not answer a ping")
        conn.ping_sent = None
        if now - conn.last_rx < self.keepalive:
            return frame(FrameType.KEEP_ALIVE)
        conn.ping_sent = now
        return frame(FrameType.KEEP_ALIVE) + frame(FrameType.PING, random.randbytes(8))

    # -- routing -----------------------------------------------------------

    def _route(self, src: _Conn, dst_key: bytes, pkt: bytes) -> None:
        conns = self._clients.get(dst_key)
        if not conns:
            if looks_like_disco(pkt) and src.peer_gone_limit.allow():
                src.enqueue_control(frame(FrameType.PEER_GONE, dst_key + bytes([PEER_GONE_NOT_HERE])))
            return
        dst = conns[-1]
        if src.key not in dst.seen_src:
            dst.seen_src.add(src.key)
            self._gone_watchers.setdefault(src.key, set()).add(dst)
        dst.enqueue_packet(src.key, pkt)

    def _note_activity(self, conn: _Conn) -> None:
        """With duplicate connections for one key, the last one to speak is
        active (the real server's lastWriterIsActive policy)."""
        conns = self._clients.get(conn.key)
        if conns and len(conns) > 1 and conns[-1] is not conn:
            conns.remove(conn)
            conns.append(conn)

    def _register(self, conn: _Conn) -> None:
        self._clients.setdefault(conn.key, []).append(conn)

    def _unregister(self, conn: _Conn) -> None:
        conns = self._clients.get(conn.key, [])
        if conn in conns:
            conns.remove(conn)
        for k in conn.seen_src:
            watchers = self._gone_watchers.get(k)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self._gone_watchers[k]
        if conns:
            return
        self._clients.pop(conn.key, None)
        # The key left the server: tell those it sent to, so they drop the route.
        for w in self._gone_watchers.pop(conn.key, set()):
            w.seen_src.discard(conn.key)
            if not w.closed:
                w.enqueue_control(frame(FrameType.PEER_GONE, conn.key + bytes([PEER_GONE_DISCONNECTED])))


class _Silent(Exception):
    """An admitted client stayed silent through a liveness ping."""


def _peername(writer: asyncio.StreamWriter) -> str:
    addr = writer.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, flushing what is queued (an HTTP error reply) unless the client
    does not read it in time; then drop it, like a Go write deadline."""
    writer.close()
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:
        pass  # already reset by the peer


def _http_reply(writer: asyncio.StreamWriter, status: str, body: str, extra: str = "") -> None:
    data = body.encode()
    writer.write((f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra}"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data)
