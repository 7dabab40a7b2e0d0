"""Webhooks: tell someone when a proxy needs a recovery, fails, or is back.

Each webhook has its own queue and delivery task, so a slow or dead receiver
delays only itself: supervision never waits on a notification, and no
receiver's answer (a 500, a redirect, a hang, bytes that are not HTTP) can
end a delivery task. A delivery gets ATTEMPTS tries with exponential backoff;
a non-2xx answer is a failed try; when all fail, one `webhook_failed` note
says so. Every payload field passes through `redact()`, and the URL is a
secret (it usually embeds a token), so it is registered for redaction and
never printed.
"""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor import httpout
from supervisor.events import Event, iso, redact, register_secret

FORMATS = ("json", "ntfy", "discord")
NOTE_KINDS = ("key_expiring", "identity")  # notes (not transitions) worth a webhook: each once per cause
DEFAULT_EVENTS = ("recovering", "failed", "running", *NOTE_KINDS)
ATTEMPTS = 5
QUEUE_LIMIT = 1000


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"
    events: tuple[str, ...] = DEFAULT_EVENTS  # states that fire (recovering, failed, running) and NOTE_KINDS


def worth_telling(ev: Event, last_state: dict[str, str]) -> bool:
    """A transition into recovering or failed, back to running from anything
    else, or a note of NOTE_KINDS (its emitter sends each once)."""
    if ev.state is None:
        return ev.kind in NOTE_KINDS
    before = last_state.get(ev.proxy)
    last_state[ev.proxy] = ev.state
    if ev.state == "running":
        return before not in (None, "running", "starting")  # a return, not every boot
    return ev.state in ("recovering", "failed") and before != ev.state


def payload(hook: Webhook, ev: Event) -> tuple[bytes, dict[str, str]]:
    """The request body and headers for one event in the webhook's format.
    Every text taken from the event is redacted."""
    proxy, state, reason = redact(ev.proxy), redact(ev.state or ev.kind), redact(ev.reason)
    text = f"{proxy}: {state}" + (f": {reason}" if reason else "")
    if hook.format == "ntfy":
        prio = {"failed": "urgent", "recovering": "high"}.get(ev.state or "", "default")
        return text.encode(), {"Title": f"ts-supervisor: {proxy} {state}", "Priority": prio,
                               "Tags": "warning" if ev.state != "running" else "white_check_mark"}
    if hook.format == "discord":
        return json.dumps({"content": f"**ts-supervisor** {text}"}).encode(), \
            {"Content-Type": "application/json"}
    body = {"proxy": proxy, "event": redact(ev.kind), "state": ev.state and state,
            "reason": reason, "time": iso(ev.wall)}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST; the 2xx status, or an exception (urllib's HTTPError for any other status)."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with httpout.opener.open(req, timeout=timeout) as resp:
        return resp.status



class Notifier:
    """Listens to the event log; delivers in the background, one task per webhook.

    `note(kind, reason)` makes an event line (kinds: webhook_failed,
    webhook_dropped); it never carries the URL. `backoff` is the first retry's
    delay in seconds (doubling after), `timeout` the seconds one attempt may take.
    """

    def __init__(self, hooks: tuple[Webhook, ...], note: Callable[[str, str], None],
                 backoff: float = 1.0, timeout: float = 10.0) -> None:
        self.hooks = hooks
        self.note = note
        self.backoff = backoff
        self.timeout = timeout
        self._queues = [asyncio.Queue[Event](QUEUE_LIMIT) for _ in hooks]
        self._last: dict[str, str] = {}
        for h in hooks:
            register_secret(h.url)

    def on_event(self, ev: Event) -> None:
        if not worth_telling(ev, self._last):
            return
        for n, (hook, q) in enumerate(zip(self.hooks, self._queues), 1):
            if (ev.state or ev.kind) in hook.events:
                try:
                    q.put_nowait(ev)
                except asyncio.QueueFull:
                    self.note("webhook_dropped", f"webhook #{n}: queue full")

    async def run(self) -> None:
        """Deliver until cancelled. Each webhook's task is on its own: none can end another."""
        tasks = [asyncio.create_task(self._deliver(n, hook, q), name=f"webhook #{n}")
                 for n, (hook, q) in enumerate(zip(self.hooks, self._queues), 1)]
        try:
            if tasks:
                await asyncio.wait(tasks)  # they end only when cancelled
            else:
                await asyncio.Event().wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _deliver(self, n: int, hook: Webhook, q: asyncio.Queue[Event]) -> None:
        while True:
            ev = await q.get()
            try:
                why = await self._send(hook, ev)
            except Exception as e:  # a fault of ours (say, in payload): it costs this delivery only
                why = f"could not send: {type(e).__name__}"
            if why is not None:
                self.note("webhook_failed", redact(f"webhook #{n}: gave up on {ev.proxy} {ev.state or ev.kind}: "
                                                   f"{why}").replace("\n", " ")[:300])

    async def _send(self, hook: Webhook, ev: Event) -> str | None:
        """Deliver one event; None, or why the last of ATTEMPTS attempts failed."""
        body, headers = payload(hook, ev)
        why = ""
        for attempt in range(1, ATTEMPTS + 1):
            if attempt > 1:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 2))
            try:
                async with asyncio.timeout(self.timeout):
                    await httpout.in_daemon_thread(_post, hook.url, body, headers, self.timeout, name="webhook")
                return None
            except Exception as e:
                why = httpout.why(e, self.timeout)
        return f"{ATTEMPTS} attempts, the last: {why}"


def parse_webhooks(raw: Any, where: str) -> tuple[tuple[Webhook, ...], list[str]]:
    """`[[webhook]]` tables from ts-supervisor.toml: (webhooks, problems), each
    problem one line starting with `where`. Any TOML value is a problem, never an exception."""
    from supervisor.config import show_key, url_problem  # config imports this module lazily
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
            problems.append(f"{where}: webhook #{i}: unknown key {show_key(sorted(unknown)[0])} "
                            "(known: events, format, url)")
        url, fmt, events = t.get("url"), t.get("format", "json"), t.get("events", list(DEFAULT_EVENTS))
        # the URL is a secret: say what is wrong with it, never what it is
        if not isinstance(url, str) or url_problem(url, ("http", "https")):
            problems.append(f"{where}: webhook #{i}: url: must be an http(s)://HOST[:PORT] URL "
                            "without spaces")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            problems.append(f"{where}: webhook #{i}: format: must be one of {', '.join(FORMATS)}")
        if not isinstance(events, list) or not all(isinstance(e, str) and e in DEFAULT_EVENTS
                                                   for e in events):
            problems.append(f"{where}: webhook #{i}: events: a list from {', '.join(DEFAULT_EVENTS)}")
        if len(problems) == before:
            hooks.append(Webhook(url, fmt, tuple(events)))
    return tuple(hooks), problems
