"""An optional Prometheus text endpoint on loopback: GET /metrics.

Per proxy: its state (one series per state, 1 for the current one), restarts,
recoveries, a histogram of detection latency (a signal seen -> the state
changed), the RSS of its children, and the last upstream probe
(`upstream_up` 1/0 and `upstream_info{result=...}`, both absent until the
first probe; results: supervisor.upstream). Rendering is a pure function of
snapshots so it is tested without a socket.
"""
from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence

import psutil

from supervisor.proxy import ProxySnapshot
from supervisor.states import State

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def children_rss(snap: ProxySnapshot) -> int:
    total = 0
    for pid in snap.child_pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


def render(snaps: Sequence[ProxySnapshot], detections: Mapping[str, Iterable[float]],
           rss: Mapping[str, int]) -> str:
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
    out += ["# HELP ts_supervisor_proxy_children_rss_bytes Resident memory of the proxy's processes.",
            "# TYPE ts_supervisor_proxy_children_rss_bytes gauge"]
    out += [f'ts_supervisor_proxy_children_rss_bytes{{proxy="{_label(s.name)}"}} {rss.get(s.name, 0)}'
            for s in snaps]
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


class MetricsServer:
    """Serves render() on a loopback address; anything but GET /metrics is a 404."""

    def __init__(self, listen: str,
                 collect: Callable[[], tuple[Sequence[ProxySnapshot], Mapping[str, Iterable[float]]]]
                 ) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError(f"metrics must listen on loopback, not {self.host}")
        self.collect = collect  # called on the loop: snapshots and detection latencies
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = head.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                snaps, detections = self.collect()
                rss = await asyncio.to_thread(lambda: {s.name: children_rss(s) for s in snaps})
                body = render(snaps, detections, rss).encode()
                status, ctype = b"200 OK", b"text/plain; version=0.0.4"
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
                         b"\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()
