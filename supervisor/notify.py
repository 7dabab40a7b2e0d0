"""Webhooks: tell someone when a proxy needs a recovery, fails, or is back.

Each webhook has its own queue and delivery task, so a slow or dead receiver
delays only itself: supervision never waits on a notification. Delivery
retries with exponential backoff; the URL is a secret (it usually embeds a
token), so it is registered for redaction and never printed.
"""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from supervisor.events import Event, iso, register_secret

FORMATS = ("json", "ntfy", "discord")
DEFAULT_EVENTS = ("recovering", "failed", "running")
ATTEMPTS = 5
QUEUE_LIMIT = 1000


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"
    events: tuple[str, ...] = DEFAULT_EVENTS  # states that fire: recovering, failed, running


def worth_telling(ev: Event, last_state: dict[str, str]) -> bool:
    """A transition into recovering or failed, or back to running from anything else."""
    if ev.state is None:
        return False
    before = last_state.get(ev.proxy)
    last_state[ev.proxy] = ev.state
    if ev.state == "running":
        return before not in (None, "running", "starting")  # a return, not every boot
    return ev.state in ("recovering", "failed") and before != ev.state


def payload(hook: Webhook, ev: Event) -> tuple[bytes, dict[str, str]]:
    """The request body and headers for one event in the webhook's format."""
    text = f"{ev.proxy}: {ev.state}" + (f": {ev.reason}" if ev.reason else "")
    if hook.format == "ntfy":
        prio = {"failed": "urgent", "recovering": "high"}.get(ev.state or "", "default")
        return text.encode(), {"Title": f"ts-supervisor: {ev.proxy} {ev.state}", "Priority": prio,
                               "Tags": "warning" if ev.state != "running" else "white_check_mark"}
    if hook.format == "discord":
        return json.dumps({"content": f"**ts-supervisor** {text}"}).encode(), \
            {"Content-Type": "application/json"}
    body = {"proxy": ev.proxy, "event": ev.kind, "state": ev.state, "reason": ev.reason,
            "time": iso(ev.wall)}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status


class Notifier:
    """Listens to the event log; delivers in the background, one task per webhook."""

    def __init__(self, hooks: tuple[Webhook, ...], note: Callable[[str, str], None],
                 backoff: float = 1.0, timeout: float = 10.0) -> None:
        self.hooks = hooks
        self.note = note  # (kind, reason) -> an event line; never carries the URL
        self.backoff = backoff
        self.timeout = timeout
        self._queues = [asyncio.Queue[Event](QUEUE_LIMIT) for _ in hooks]
        self._last: dict[str, str] = {}
        for h in hooks:
            register_secret(h.url)

    def on_event(self, ev: Event) -> None:
        if not worth_telling(ev, self._last):
            return
        for hook, q in zip(self.hooks, self._queues):
            if ev.state in hook.events:
                try:
                    q.put_nowait(ev)
                except asyncio.QueueFull:
                    self.note("webhook_dropped", f"webhook #{self.hooks.index(hook) + 1}: queue full")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, (hook, q) in enumerate(zip(self.hooks, self._queues)):
                tg.create_task(self._deliver(i + 1, hook, q))

    async def _deliver(self, n: int, hook: Webhook, q: asyncio.Queue[Event]) -> None:
        while True:
            ev = await q.get()
            body, headers = payload(hook, ev)
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await asyncio.to_thread(_post, hook.url, body, headers, self.timeout)
                    break
                except (OSError, urllib.error.URLError) as e:
                    why = getattr(e, "reason", None) or e
                    if attempt == ATTEMPTS:
                        self.note("webhook_failed", f"webhook #{n}: gave up on {ev.proxy} {ev.state} "
                                                    f"after {ATTEMPTS} attempts: {why}")
                        break
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))


def parse_webhooks(raw: Any, where: str) -> tuple[tuple[Webhook, ...], list[str]]:
    """`[[webhook]]` tables from ts-supervisor.toml: (webhooks, problems)."""
    if not isinstance(raw, list):
        return (), [f"{where}: webhook: must be [[webhook]] tables"]
    hooks, problems = [], []
    for i, t in enumerate(raw, 1):
        before = len(problems)
        if not isinstance(t, dict):
            problems.append(f"{where}: webhook #{i}: must be a table")
            continue
        unknown = set(t) - {"url", "format", "events"}
        if unknown:
            problems.append(f"{where}: webhook #{i}: unknown key {sorted(unknown)[0]} (known: events, format, url)")
        url, fmt, events = t.get("url"), t.get("format", "json"), t.get("events", list(DEFAULT_EVENTS))
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            problems.append(f"{where}: webhook #{i}: url: must be an http(s) URL")
        if fmt not in FORMATS:
            problems.append(f"{where}: webhook #{i}: format: must be one of {', '.join(FORMATS)}")
        if not isinstance(events, list) or not set(events) <= set(DEFAULT_EVENTS):
            problems.append(f"{where}: webhook #{i}: events: a list from {', '.join(DEFAULT_EVENTS)}")
        if len(problems) == before:
            hooks.append(Webhook(url, fmt, tuple(events)))
    return tuple(hooks), problems
