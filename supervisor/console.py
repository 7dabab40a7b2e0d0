"""The console: a live rich table of every proxy, or one line per event.

`render()` is a pure function of frozen snapshots (rich's Live examples), so
it is tested on a capturing Console and costs the same whoever calls it.
The live view redraws when an event arrives; a slow tick only refreshes
uptime and CPU/RSS figures.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from supervisor.events import Event, redact
from supervisor.proxy import ProxySnapshot

STATE_STYLE = {
    "running": "bold green", "starting": "cyan", "recovering": "bold yellow",
    "backoff": "magenta", "failed": "bold red", "stopped": "dim",
}
TICK = 2.0  # seconds; only for uptime and resource columns


def human_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


Usage = Mapping[str, tuple[float, int]]  # proxy name -> (CPU %, RSS bytes)


def render(snaps: Sequence[ProxySnapshot], usage: Usage | None = None, now: float | None = None,
           errors: Sequence[str] = ()) -> Group:
    """The table (plus config errors under it) for a moment in time."""
    now = time.time() if now is None else now
    usage = usage or {}
    t = Table(title="ts-supervisor", title_justify="left", expand=False, pad_edge=False)
    t.add_column("proxy", style="bold", no_wrap=True)
    t.add_column("host / DNS name", overflow="fold")
    t.add_column("state", no_wrap=True)
    t.add_column("tailnet IP", no_wrap=True)
    t.add_column("target", overflow="fold")
    t.add_column("pid", justify="right")
    t.add_column("CPU", justify="right")
    t.add_column("RSS", justify="right")
    t.add_column("up", justify="right")
    t.add_column("rst", justify="right")
    t.add_column("rec", justify="right")
    t.add_column("last error", overflow="fold", max_width=48)
    for s in snaps:
        cpu, rss = usage.get(s.name, (None, None))
        ip4 = next((ip for ip in s.tailscale_ips if ":" not in ip), s.tailscale_ips[0] if s.tailscale_ips else "")
        host = s.hostname if not s.dns_name else f"{s.hostname}\n[dim]{s.dns_name}[/]"
        up = human_duration(now - s.running_since) if s.running_since else "-"
        t.add_row(
            s.name, host, Text(s.state, style=STATE_STYLE.get(s.state, "")), ip4 or "-",
            s.target, str(s.pid) if s.pid else "-",
            f"{cpu:.1f}%" if cpu is not None and s.pid else "-",
            human_bytes(rss) if rss and s.pid else "-", up, str(s.restarts), str(s.recoveries),
            Text(redact(s.last_error), style="red" if s.state == "failed" else "dim"))
    parts: list = [t]
    for e in errors:
        parts.append(Text(f"config error: {redact(e)}", style="red"))
    return Group(*parts)


class ResourceSampler:
    """CPU% and RSS per proxy from psutil; keeps Process objects so that
    cpu_percent measures the interval since the previous sample."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, snaps: Sequence[ProxySnapshot]) -> dict[str, tuple[float, int]]:
        out: dict[str, tuple[float, int]] = {}
        live: set[int] = set()
        for s in snaps:
            cpu, rss = 0.0, 0
            for pid in s.child_pids:
                live.add(pid)
                try:
                    p = self._procs.get(pid)
                    if p is None:
                        p = self._procs[pid] = psutil.Process(pid)
                        p.cpu_percent(None)
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                except psutil.Error:
                    self._procs.pop(pid, None)
            out[s.name] = (cpu, rss)
        for pid in set(self._procs) - live:
            del self._procs[pid]
        return out


class LiveTable:
    """Redraws on events (woken by the fleet's event listener), ticks slowly otherwise."""

    def __init__(self, fleet, console: Console):
        self.fleet = fleet
        self.console = console
        self.sampler = ResourceSampler()
        self._dirty = asyncio.Event()

    def on_event(self, ev: Event) -> None:
        self._dirty.set()

    def frame(self) -> Group:
        snaps = self.fleet.snapshots()
        return render(snaps, self.sampler.sample(snaps), errors=[str(e) for e in self.fleet.config_errors])

    async def run(self) -> None:
        with Live(self.frame(), console=self.console, auto_refresh=False, transient=False) as live:
            while True:
                try:
                    await asyncio.wait_for(self._dirty.wait(), TICK)
                except TimeoutError:
                    pass
                self._dirty.clear()
                live.update(self.frame(), refresh=True)
