"""An optional HTTP endpoint on loopback: Prometheus text at /metrics, health at /healthz.

Served whenever the settings file has `metrics = "127.0.0.1:PORT"`.

GET /metrics: per proxy, its state (one series per state, 1 for the current
one), restarts, recoveries, a histogram of detection latency (a signal seen ->
the state changed), the memory of its children as PSS and USS (bytes, from the
last `memory_period` sample: supervisor.memory; absent until the first sample
and while the proxy has no children), and the last upstream probe
(`upstream_up` 1/0 and `upstream_info{result=...}`, both absent until the
first probe; results: supervisor.upstream).
`ts_supervisor_proxy_children_rss_bytes` is deprecated (RSS counts the pages
the children share once per child): it stays, from the same sample (0 without
one), for one release.

GET /healthz: the fleet, for a NAS, a reverse proxy or an uptime monitor.
  200 when every proxy that should run is `running` and every file in the
  config dir loads; 503 otherwise. Proxies the operator stopped (state
  `stopped`) are listed but do not count, so a fleet with none that should run
  (and no bad file) is healthy. Body (application/json), both codes:
    {"healthy": bool,
     "proxies": [{"name": str, "state": str, "reason": str, "upstream": str|null}],
     "config_errors": [str]}
  proxies in name order. `reason`: why the proxy is not running (its reason,
  else its last error; "" for a running proxy), secrets redacted. `upstream`:
  the last probe of its target ("ok", "refused", ...; null before the first),
  shown only: a failing upstream is not a proxy state and does not make the
  proxy unhealthy. `config_errors`: one line ("PATH: KEY: REASON", as `status`
  shows) per error of a file that does not load (or of the config dir itself),
  secrets redacted; a bad file is configuration the supervisor is not applying,
  so any makes the fleet unhealthy. A proxy whose file turned bad while it ran
  keeps running with its old config and is listed as such.
GET /healthz/NAME: the same for one proxy, whatever its state: 200 if it is
  `running`, 503 if not (`stopped` included), with the same body listing just
  it and just its file's config errors (a proxy running on its old config with
  a bad file is still judged by its state). A proxy that is not running because
  its file NAME.toml does not load: 503, listed with state "invalid" and its
  first error line as reason. 404 with {"error": str} when neither a proxy nor
  a file is named NAME (taken as it appears in the path, not percent-decoded;
  echoed only when it looks like a proxy name).

`degraded`, `starting`, `recovering`, `backoff` and `failed` are all unhealthy.
A control-plane outage alone is not: the node keeps serving its peers, and the
supervisor leaves such a proxy `running` (containerboot declined to base its
/healthz on `Online` for the same reason).

HEAD is answered like GET, without the body. Whatever else a client sends costs
that one connection, with a 4xx and `Connection: close`: 400 for a request head
that is not HTTP/1.x, 404 for any other path, 405 for another method, 408 when
the head takes longer than HEAD_TIMEOUT, 431 when it exceeds MAX_HEAD bytes.
Beyond MAX_CONNECTIONS at once, a connection gets 503 at once. Rendering and
the health verdict are pure functions of snapshots and config errors, tested
without a socket.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus

from supervisor.config import ConfigError
from supervisor.events import redact
from supervisor.proxy import ProxySnapshot
from supervisor.states import HEALTHY_STATES, State

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_HEAD = 16 << 10       # bytes of request line and headers, the blank line included
HEAD_TIMEOUT = 5.0        # seconds a client has to send them
LINGER = 1.0              # seconds to read what a client still sends after its answer
MAX_CONNECTIONS = 32      # served at once; more get a 503 without being read
METRICS_TYPE = "text/plain; version=0.0.4"
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain"
_HEALTHY = {s.value for s in HEALTHY_STATES}
_ECHOABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # a proxy name (config.py's grammar)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")      # an HTTP method (RFC 9110 token)
_TARGET = re.compile(rb"[\x21-\x7e]+")                    # visible ASCII, no spaces
_VERSION = re.compile(rb"HTTP/1\.[0-9]")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(snaps: Sequence[ProxySnapshot], detections: Mapping[str, Iterable[float]]) -> str:
    out = [
        "# HELP ts_supervisor_proxy_state 1 for the proxy's current state.",
        "# TYPE ts_supervisor_proxy_state gauge",
    ]
    for s in snaps:
        for st in State:
            out.append(f'ts_supervisor_proxy_state{{proxy="{_label(s.name)}",state="{st.value}"}} '
                       f"{int(s.state == st.value)}")
    for metric, help_, attr in (("restarts", "Crash restarts.", "restarts"),
                                ("recoveries", "Stale-state recoveries (wipes or re-auths).", "recoveries")):
        out += [f"# HELP ts_supervisor_proxy_{metric}_total {help_}",
                f"# TYPE ts_supervisor_proxy_{metric}_total counter"]
        out += [f'ts_supervisor_proxy_{metric}_total{{proxy="{_label(s.name)}"}} {getattr(s, attr)}'
                for s in snaps]
    for metric, help_ in (("pss", "Proportional set size of the proxy's processes (shared pages split "
                                  "among the processes sharing them), at the last sample."),
                          ("uss", "Unique set size of the proxy's processes (what exiting them frees), "
                                  "at the last sample.")):
        out += [f"# HELP ts_supervisor_proxy_children_{metric}_bytes {help_}",
                f"# TYPE ts_supervisor_proxy_children_{metric}_bytes gauge"]
        out += [f'ts_supervisor_proxy_children_{metric}_bytes{{proxy="{_label(s.name)}"}} {v}' for s in snaps
                if s.memory is not None and (v := getattr(s.memory, metric)) is not None]
    out += ["# HELP ts_supervisor_proxy_children_rss_bytes Deprecated: use ..._children_pss_bytes (RSS counts "
            "shared pages once per process). Resident memory of the proxy's processes at the last sample.",
            "# TYPE ts_supervisor_proxy_children_rss_bytes gauge"]
    out += [f'ts_supervisor_proxy_children_rss_bytes{{proxy="{_label(s.name)}"}} '
            f'{s.memory.rss if s.memory else 0}' for s in snaps]
    probed = [s for s in snaps if s.upstream is not None]
    out += ["# HELP ts_supervisor_proxy_upstream_up 1 when the last probe of the proxy's target was ok.",
            "# TYPE ts_supervisor_proxy_upstream_up gauge"]
    out += [f'ts_supervisor_proxy_upstream_up{{proxy="{_label(s.name)}"}} {int(s.upstream == "ok")}'
            for s in probed]
    out += ["# HELP ts_supervisor_proxy_upstream_info The last probe's result, as in the table.",
            "# TYPE ts_supervisor_proxy_upstream_info gauge"]
    out += [f'ts_supervisor_proxy_upstream_info{{proxy="{_label(s.name)}",result="{_label(s.upstream)}"}} 1'
            for s in probed]
    out += ["# HELP ts_supervisor_detection_latency_seconds A signal seen to the state changed.",
            "# TYPE ts_supervisor_detection_latency_seconds histogram"]
    for s in snaps:
        values = list(detections.get(s.name, ()))
        name = _label(s.name)
        for b in BUCKETS:
            out.append(f'ts_supervisor_detection_latency_seconds_bucket{{proxy="{name}",le="{b:g}"}} '
                       f"{sum(1 for v in values if v <= b)}")
        out.append(f'ts_supervisor_detection_latency_seconds_bucket{{proxy="{name}",le="+Inf"}} {len(values)}')
        out.append(f'ts_supervisor_detection_latency_seconds_sum{{proxy="{name}"}} {sum(values):.6f}')
        out.append(f'ts_supervisor_detection_latency_seconds_count{{proxy="{name}"}} {len(values)}')
    return "\n".join(out) + "\n"


def health_entry(s: ProxySnapshot) -> dict[str, str | None]:
    """One proxy in a /healthz body (shape: the module docstring)."""
    reason = s.reason or ("" if s.state in _HEALTHY else s.last_error)  # not a healed error
    return {"name": s.name, "state": s.state, "reason": redact(reason),
            "upstream": None if s.upstream is None else redact(s.upstream)}


def _file_proxy(e: ConfigError) -> str | None:
    """The proxy a config error's file names (its stem, as config.py derives it);
    None for the config dir itself."""
    return e.path.stem if e.path.suffix == ".toml" else None


def health(snaps: Sequence[ProxySnapshot], name: str | None = None,
           config_errors: Sequence[ConfigError] = ()) -> tuple[int, dict]:
    """The /healthz verdict: (HTTP status, JSON body) for the fleet (name None)
    or for the proxy `name`, given the fleet's snapshots and the errors of the
    files that do not load. Codes and shapes: the module docstring."""
    if name is None:
        counted = [s for s in snaps if s.state != State.STOPPED.value]
        healthy = not config_errors and all(s.state in _HEALTHY for s in counted)
        return (200 if healthy else 503), {"healthy": healthy,
                                           "proxies": [health_entry(s) for s in snaps],
                                           "config_errors": [redact(str(e)) for e in config_errors]}
    one = next((s for s in snaps if s.name == name), None)
    mine = [redact(str(e)) for e in config_errors if _file_proxy(e) == name] \
        if _ECHOABLE.fullmatch(name) else []
    if one is None and mine:
        return 503, {"healthy": False, "config_errors": mine,
                     "proxies": [{"name": name, "state": "invalid", "reason": mine[0], "upstream": None}]}
    if one is None:
        shown = f"no proxy named {name}" if _ECHOABLE.fullmatch(name) else "no such proxy"
        return 404, {"error": shown}
    healthy = one.state in _HEALTHY
    return (200 if healthy else 503), {"healthy": healthy, "proxies": [health_entry(one)],
                                       "config_errors": mine}


class Refused(Exception):
    """A request the endpoint refuses: `status` (4xx) and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str]:
    """(method, path) from an HTTP/1.x request head (request line, headers, blank
    line); the path without its query. Raises Refused: 400 for anything that is
    not such a request line, 405 for a method other than GET or HEAD."""
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or not _VERSION.fullmatch(parts[2]) or not _TOKEN.fullmatch(parts[0]):
        raise Refused(400, "not an HTTP/1.x request line")
    method, target = parts[0].decode(), parts[1]
    if not _TARGET.fullmatch(target):
        raise Refused(400, "bad request target")
    if target.startswith((b"http://", b"https://")):  # absolute form, as proxies send it
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    if not target.startswith(b"/"):
        raise Refused(400, "bad request target")
    if method not in ("GET", "HEAD"):
        raise Refused(405, f"method {method} not allowed")
    return method, target.split(b"?", 1)[0].decode()


def response(status: int, ctype: str, body: bytes, head_only: bool = False) -> bytes:
    """One whole HTTP/1.1 response that closes the connection."""
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}"
            "Connection: close\r\n\r\n").encode() + (b"" if head_only else body)


def _json(status: int, body: dict) -> tuple[int, str, bytes]:
    return status, JSON_TYPE, json.dumps(body).encode() + b"\n"  # ASCII: every control byte escaped


def route(path: str, snaps: Sequence[ProxySnapshot],
          config_errors: Sequence[ConfigError] = ()) -> tuple[int, str, bytes]:
    """(status, content type, body) for a GET of `path` other than /metrics."""
    if path == "/healthz":
        return _json(*health(snaps, None, config_errors))
    if path.startswith("/healthz/"):
        return _json(*health(snaps, path.removeprefix("/healthz/"), config_errors))
    return 404, TEXT_TYPE, b"not found\n"


class MetricsServer:
    """Serves /metrics and /healthz on a loopback address (the module docstring)."""

    def __init__(self, listen: str,
                 collect: Callable[[], tuple[Sequence[ProxySnapshot], Mapping[str, Iterable[float]]]],
                 config_errors: Callable[[], Sequence[ConfigError]] = tuple) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError(f"metrics must listen on loopback, not {self.host}")
        self.collect = collect  # called on the loop: snapshots and detection latencies
        self.config_errors = config_errors  # called on the loop: the files that do not load
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        """The response to the one request on this connection; None if the client
        left before sending one."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path = parse_head(head)
        except asyncio.IncompleteReadError as e:
            return response(400, TEXT_TYPE, b"incomplete request\n") if e.partial.strip() else None
        except asyncio.LimitOverrunError:
            return response(431, TEXT_TYPE, b"request head too large\n")
        except TimeoutError:
            return response(408, TEXT_TYPE, b"request head too slow\n")
        except Refused as e:
            return response(e.status, TEXT_TYPE, str(e).encode() + b"\n")
        snaps, detections = self.collect()
        if path == "/metrics":  # memory comes sampled in the snapshots: a scrape reads no /proc
            status, ctype, body = 200, METRICS_TYPE, render(snaps, detections).encode()
        else:
            status, ctype, body = route(path, snaps, self.config_errors())
        return response(status, ctype, body, head_only=method == "HEAD")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, one request, one answer, close. Never raises (but for
        cancellation): whatever the client sends or does costs only this connection."""
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                writer.write(response(503, TEXT_TYPE, b"too many connections\n"))
                return
            answer = await self._answer(reader)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
                # Read what the client still sends before closing, so that the answer
                # is not lost to the reset that closing with unread data causes.
                writer.write_eof()
                async with asyncio.timeout(LINGER):
                    while await reader.read(MAX_HEAD):
                        pass
        except (OSError, RuntimeError, TimeoutError):
            pass  # the client went away, or would not stop sending
        finally:
            self._open -= 1
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass
