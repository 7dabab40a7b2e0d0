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
from rich import box
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


WIDE = 130  # below this, facts share cells; below MEDIUM, pid and CPU/RSS give way to the error
MEDIUM = 96


def render(snaps: Sequence[ProxySnapshot], usage: Usage | None = None, now: float | None = None,
           errors: Sequence[str] = (), width: int = 200) -> Group:
    """The table (plus config errors under it) for a moment in time.

    Borderless, with related facts sharing a cell, so an 80-column SSH session
    still shows every proxy's state, address, target and last error."""
    now = time.time() if now is None else now
    usage = usage or {}
    wide = width >= WIDE
    medium = not wide and width >= MEDIUM
    t = Table(title="ts-supervisor", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=(0, 1), expand=False)
    t.add_column("proxy / DNS name", no_wrap=True, max_width=30 if wide else 26 if medium else 22)
    if wide:
        for col in ("state", "tailnet IP"):
            t.add_column(col, no_wrap=True)
        t.add_column("target", no_wrap=True, overflow="ellipsis", max_width=28)
        t.add_column("pid", justify="right", no_wrap=True)
        t.add_column("cpu rss", justify="right", no_wrap=True)
        t.add_column("up", justify="right", no_wrap=True)
        t.add_column("rst/rec", justify="right", no_wrap=True)
        t.add_column("last error", overflow="fold", min_width=24, ratio=1)
    else:  # 80 columns: the error goes under the state, counts under uptime
        t.add_column("state / last error", overflow="fold", ratio=1)
        t.add_column("tailnet IP / target", no_wrap=True, max_width=21)
        if medium:
            t.add_column("pid / cpu rss", justify="right", no_wrap=True)
        t.add_column("up r/r", justify="right", no_wrap=True)
    for s in snaps:
        cpu, rss = usage.get(s.name, (None, None))
        ip4 = next((ip for ip in s.tailscale_ips if ":" not in ip), s.tailscale_ips[0] if s.tailscale_ips else "")
        name = Text(s.name, style="bold")
        label = s.dns_name or (s.hostname if s.hostname != s.name else "")
        if label:
            name.append(f"\n{label}", style="dim")
        target = s.target.replace("http://", "").replace("tcp://", "tcp ")
        up = human_duration(now - s.running_since) if s.running_since else "-"
        res = f"{cpu:.1f}% {human_bytes(rss)}" if cpu is not None and rss and s.pid else "-"
        state = Text(s.state, style=STATE_STYLE.get(s.state, ""))
        error_style = "red" if s.state == "failed" else "dim"
        counts = f"{s.restarts}/{s.recoveries}"
        if wide:
            t.add_row(name, state, ip4 or "-", target, str(s.pid) if s.pid else "-", res, up, counts,
                      Text(redact(s.last_error), style=error_style))
        else:
            if s.last_error:
                state.append(f"\n{redact(s.last_error)}", style=error_style)
            cells = [name, state, Text(ip4 or "-").append(f"\n{target}", style="dim")]
            if medium:
                cells.append(f"{s.pid or '-'}\n{res}")
            t.add_row(*cells, f"{up}\n{counts}")
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
        return render(snaps, self.sampler.sample(snaps), errors=[str(e) for e in self.fleet.config_errors],
                      width=self.console.width)

    async def run(self) -> None:
        with Live(self.frame(), console=self.console, auto_refresh=False, transient=False) as live:
            while True:
                try:
                    await asyncio.wait_for(self._dirty.wait(), TICK)
                except TimeoutError:
                    pass
                self._dirty.clear()
                live.update(self.frame(), refresh=True)
