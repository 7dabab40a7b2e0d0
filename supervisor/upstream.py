"""Upstream health: is a proxy's target reachable the way `tailscale serve` reaches it?

`probe(target)` is seen, never acted on: a failing upstream restarts nothing
and is not a proxy state. The runner stores its result in
`ProxySnapshot.upstream`; the table, `status --json` ("upstream") and the
metrics (`ts_supervisor_proxy_upstream_up`, `..._upstream_info{result=...}`)
show it as is, so these strings are part of the product and kept stable:

=================================================  ==========================================
result                                             meaning
=================================================  ==========================================
``ok``                                             the target answers as serve needs it to
``refused``                                        nothing listens there (ECONNREFUSED)
``timeout``                                        no answer within the probe's timeout
``unreachable: REASON``                            no route, name not resolved, no such
                                                   socket, permission denied ... (the OS's
                                                   words, lower case)
``TLS: certificate not trusted — use               an ``https://`` target whose certificate
https+insecure://HOST:PORT``                       does not verify (self-signed, no IP SAN,
                                                   expired, other name): serve's requests get
                                                   HTTP 502
``TLS: REASON``                                    any other handshake failure
                                                   (``TLS: wrong version number`` ...)
``not HTTP: REASON``                               an ``http(s)://`` target that answers, but
                                                   not with HTTP (``closed without
                                                   answering``, ``answered 'SSH-2.0-…'``,
                                                   ``a TLS server — use https://HOST:PORT``)
``bad target: REASON``                             the target cannot be parsed
``error: REASON``                                  anything else (a bug: please report it)
=================================================  ==========================================

Every result is one line of at most `MAX_LEN` characters (a longer reason is
cut in the middle, so its end survives).

Target kinds, as `tailscale serve` takes them:

- ``http://HOST[:PORT][/PATH]`` (also a bare ``PORT`` or ``HOST:PORT``, as
  serve expands them): an HTTP/1.1 ``HEAD PATH`` request; any status, 404 or
  500 included, is ``ok``: the upstream answers;
- ``https://HOST[:PORT][/PATH]``: a TLS handshake verified against the system
  roots and the host name or IP (as Go's default client in serve does), then
  the same request;
- ``https+insecure://HOST[:PORT][/PATH]``: the same without verification;
- ``tcp://HOST:PORT``: a TCP connect;
- ``unix:/PATH`` (tailscale 1.94 and later): a connect to the unix socket.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

OK = "ok"
REFUSED = "refused"
TIMEOUT = "timeout"
UNTRUSTED = "TLS: certificate not trusted — use https+insecure://{authority}"
HANDSHAKE_CLOSED = "TLS: connection closed during handshake"
MAX_LEN = 120  # characters in one result
DEFAULT_PORTS = {"http": 80, "https": 443, "https+insecure": 443}

_ERRNO = {  # the OS's words for the usual cases, stable across libc versions
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENOENT: "no such socket",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EADDRNOTAVAIL: "address not available",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed",
}
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? \d{3}")


class BadTarget(ValueError):
    """A target `probe` cannot parse; str() is the reason."""


class NotHTTP(Exception):
    """The upstream answered, but not with HTTP; str() is what it said."""


@dataclass(frozen=True)
class Target:
    """A parsed target: `kind` is http | https | https+insecure | tcp | unix."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = "/"  # the request path (http kinds) or the socket's path (unix)

    @property
    def authority(self) -> str:
        """HOST:PORT, with brackets around an IPv6 host (the path for unix)."""
        if self.kind == "unix":
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse(target: str) -> Target:
    """A serve target as `Target`; raises BadTarget with a short reason."""
    if not isinstance(target, str) or not target.strip():
        raise BadTarget("empty")
    target = target.strip()
    if any(ord(c) < 0x21 or c == "\x7f" for c in target):
        raise BadTarget("contains spaces or control characters")
    if target.isdigit():  # serve's shorthands: "3000", "localhost:3000"
        target = f"http://127.0.0.1:{target}"
    elif "://" not in target and not target.startswith("unix:"):
        target = f"http://{target}"
    try:
        parts = urlsplit(target)
    except ValueError as e:  # "Invalid IPv6 URL" ...
        raise BadTarget(str(e).lower() or "not a URL") from None
    kind = parts.scheme.lower()
    if kind == "unix":
        path = parts.path
        if parts.netloc or not path.startswith("/"):
            raise BadTarget("a unix target looks like unix:/path/to.sock")
        return Target("unix", path=path)
    if kind not in ("http", "https", "https+insecure", "tcp"):
        raise BadTarget(f"unknown scheme {parts.scheme!r} (http, https, https+insecure, tcp, unix)")
    try:
        port = parts.port
    except ValueError:
        raise BadTarget("port is not a number in 1-65535") from None
    if not parts.hostname:
        raise BadTarget("no host")
    if port is None:
        if kind == "tcp":
            raise BadTarget("tcp:// needs a port")
        port = DEFAULT_PORTS[kind]
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(kind, parts.hostname, port, path)


def _cut(text: str, limit: int = MAX_LEN) -> str:
    """One line of at most `limit` characters, cut in the middle."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return text[:half] + "…" + text[len(text) - (limit - 1 - half):]


def _snippet(data: bytes, limit: int = 40) -> str:
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    shown = "".join(chr(b) if 0x20 <= b < 0x7f else f"\\x{b:02x}" for b in line[:limit])
    return shown + ("…" if len(line) > limit else "")


def classify(exc: BaseException, authority: str = "HOST:PORT") -> str:
    """The one-line result for an exception raised while probing; `authority`
    (HOST:PORT of the target) goes into the https+insecure hint. Pure."""
    if isinstance(exc, BadTarget):
        return _cut(f"bad target: {exc}")
    if isinstance(exc, NotHTTP):
        return _cut(f"not HTTP: {exc}")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return TIMEOUT
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _cut(UNTRUSTED.format(authority=authority))
    if isinstance(exc, ssl.SSLEOFError):
        return HANDSHAKE_CLOSED
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or exc.strerror or (exc.args and str(exc)) or type(exc).__name__
        return _cut(f"TLS: {str(reason).replace('_', ' ').lower()}")
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, socket.gaierror):
        return "unreachable: name not resolved"
    if isinstance(exc, OSError):
        if exc.errno == errno.ECONNREFUSED:
            return REFUSED
        if exc.errno == errno.ETIMEDOUT:
            return TIMEOUT
        reason = _ERRNO.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__).lower()
        return _cut(f"unreachable: {reason}")
    if isinstance(exc, asyncio.IncompleteReadError):
        return "not HTTP: closed without answering"
    return _cut(f"error: {type(exc).__name__}: {exc}")


@functools.cache
def _context(verify: bool) -> ssl.SSLContext:
    """One client context per mode for the life of the process (loading the
    system roots costs milliseconds; 200 proxies probe on the same period)."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _exchange(t: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send `HEAD path` and read the status line; raises NotHTTP unless it is HTTP."""
    writer.write(f"HEAD {t.path} HTTP/1.1\r\nHost: {t.authority}\r\n"
                 f"User-Agent: ts-supervisor-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = b""
    while len(answer) < 12:  # "HTTP/1.1 200"
        chunk = await reader.read(256)
        if not chunk:
            break
        answer += chunk
    if _STATUS_LINE.match(answer):
        return
    if not answer:
        raise NotHTTP("closed without answering")
    if answer[:1] in (b"\x15", b"\x16") and answer[1:2] == b"\x03":  # a TLS record: alert or handshake
        raise NotHTTP(f"a TLS server — use https://{t.authority}")
    raise NotHTTP(f"answered '{_snippet(answer)}'")


async def _probe(t: Target) -> str:
    tls = t.kind in ("https", "https+insecure")
    try:
        if t.kind == "unix":
            reader, writer = await asyncio.open_unix_connection(t.path)
        elif tls:
            reader, writer = await asyncio.open_connection(
                t.host, t.port, ssl=_context(t.kind == "https"), server_hostname=t.host)
        else:
            reader, writer = await asyncio.open_connection(t.host, t.port)
    except (ConnectionResetError, BrokenPipeError):
        if tls:  # accepted, then hung up on the ClientHello
            return HANDSHAKE_CLOSED
        raise
    try:
        if t.kind in ("http", "https", "https+insecure"):
            try:
                await _exchange(t, reader, writer)
            except (ConnectionResetError, BrokenPipeError):
                raise NotHTTP("closed without answering") from None
        return OK
    finally:
        writer.transport.abort()  # no TLS close_notify dance: a silent peer must not hold us


async def probe(target: str, timeout: float = 3.0) -> str:
    """Probe `target` (a serve target, see the module docstring) within
    `timeout` seconds overall, and return one of the documented one-line
    results. Never raises (a cancellation of the caller still propagates) and
    never blocks the loop."""
    try:
        t = parse(target)
    except BadTarget as e:
        return classify(e)
    try:
        async with asyncio.timeout(timeout):
            return await _probe(t)
    except Exception as e:  # noqa: BLE001 - every failure is one line
        return classify(e, t.authority)
