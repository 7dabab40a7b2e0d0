"""The event log (DATA/events.jsonl), secret redaction, and per-proxy rotated logs.

Every state transition is an event; the console and `status` listen here
instead of polling. All text passes through `redact` on its way out, so an
auth key can never reach a log, a table or a status answer.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Key formats redacted wherever they stand as a whole token (not inside a longer
# word or hex string): Tailscale's tskey-..., and headscale's pre-auth keys,
# hskey-auth-PREFIX-SECRET (juanfont/headscale 0.26 and later) and 48 hex
# characters before that. A 64-hex node key, machine key or sha256 is never touched.
_TOKEN = r"(?<![A-Za-z0-9_-])"
_KEY_RE = re.compile(r"tskey-[A-Za-z0-9_-]+")
_HSKEY_RE = re.compile(_TOKEN + r"hskey-[A-Za-z0-9_-]+")
_HEX48_RE = re.compile(_TOKEN + r"[0-9a-fA-F]{48}(?![A-Za-z0-9_-])")
_secrets: set[str] = set()
# The shortest text `redact` removes as a registered secret: anything shorter
# would also cut common words out of every line. config.py refuses a secret
# shorter than this (a real key is far longer), so none can be shown.
SECRET_MIN = 8


def register_secret(secret: str) -> None:
    """Remember a secret so that `redact` removes it even if it has no tskey- prefix.
    One shorter than SECRET_MIN is ignored (config.py refuses it)."""
    if secret and len(secret) >= SECRET_MIN:
        _secrets.add(secret)


def register_configured(*sources: Any) -> None:
    """Register every secret that settings or proxy configs name, read once:
    each `*_file` file's text (auth keys, OAuth client secrets, API tokens),
    each `*_env` variable's value, each webhook's URL. What cannot be read is
    skipped (the loader reports it). Callers: every process that shows text."""
    from dataclasses import fields, is_dataclass

    from supervisor.config import KEY_LIMIT, Unreadable, read_text
    for src in sources:
        if not is_dataclass(src):
            continue
        for f in fields(src):
            value = getattr(src, f.name)
            if f.name.endswith("_file") and isinstance(value, Path):
                try:
                    register_secret(read_text(value, KEY_LIMIT).strip())
                except Unreadable:
                    pass
            elif f.name.endswith("_env") and isinstance(value, str):
                register_secret(os.environ.get(value, "").strip())
        for hook in getattr(src, "webhooks", ()) or ():
            if isinstance(getattr(hook, "url", None), str):
                register_secret(hook.url)


def redact(text: str) -> str:
    """`text` without any registered secret or key-shaped token."""
    for s in sorted(_secrets, key=len, reverse=True):  # a secret inside another goes last
        if s in text:
            text = text.replace(s, "[REDACTED]")
    text = _KEY_RE.sub("tskey-[REDACTED]", text)
    text = _HSKEY_RE.sub("hskey-[REDACTED]", text)
    return _HEX48_RE.sub("[REDACTED]", text)


def redact_json(value: Any) -> Any:
    """A JSON value with `redact` applied to every string in it, keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_json(v) for k, v in value.items()}
    return value


def _private(path: str, flags: int) -> int:
    """open() opener: files the supervisor writes are its user's alone (0600)."""
    return os.open(path, flags, 0o600)


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).astimezone().isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Event:
    proxy: str
    kind: str             # a transition name ("running", "recovering", ...) or a note
    state: str | None     # the state after the event, if it is a transition
    reason: str = ""
    t: float = field(default_factory=time.monotonic)  # comparable with the control's event log
    wall: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"t": round(self.t, 6), "time": iso(self.wall), "proxy": self.proxy,
               "event": self.kind, "state": self.state, "reason": redact(self.reason)}
        if self.detail:
            out["detail"] = json.loads(redact(json.dumps(self.detail)))
        return out

    def line(self) -> str:
        """One human line per event, for --no-console and logs."""
        when = datetime.fromtimestamp(self.wall).strftime("%Y-%m-%d %H:%M:%S")
        what = self.kind if self.state in (None, self.kind) else f"{self.kind}, now {self.state}"
        reason = f": {redact(self.reason)}" if self.reason else ""
        return f"{when} {self.proxy}: {what}{reason}"


class EventLog:
    """Appends events to events.jsonl and tells listeners (console, IPC) at once."""

    def __init__(self, path: Path | None, max_bytes: int = 5 << 20):
        self.path = path
        self.max_bytes = max_bytes
        self.listeners: list[Callable[[Event], None]] = []
        self.recent: list[Event] = []
        self.dropped = 0  # lines the disk refused
        self._f = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", buffering=1, opener=_private)

    def emit(self, event: Event) -> None:
        """Record and announce. A full or read-only disk loses the line on
        disk (counted in `dropped`), never the event: listeners still hear it."""
        if self._f is not None:
            try:
                self._f.write(json.dumps(event.to_json()) + "\n")
                if self._f.tell() > self.max_bytes:
                    self._rotate()
            except OSError:
                self.dropped += 1
        self.recent.append(event)
        del self.recent[:-500]
        for listener in list(self.listeners):
            listener(event)

    def _rotate(self) -> None:
        assert self.path is not None and self._f is not None
        self._f.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._f = open(self.path, "a", buffering=1, opener=_private)

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


class RotatingLog:
    """tailscaled's output for one proxy: NAME/tailscaled.log, rotated at a size,
    `keep` old files. Lines are redacted like everything else."""

    def __init__(self, path: Path, max_bytes: int = 2 << 20, keep: int = 2):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.dropped = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1, opener=_private)

    def write(self, line: str) -> None:
        """Append one line; a full disk drops it (counted), it never raises."""
        try:
            self._write(line)
        except OSError:
            self.dropped += 1

    def _write(self, line: str) -> None:
        self._f.write(redact(line) + "\n")
        if self._f.tell() > self.max_bytes:
            self._f.close()
            for i in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._f = open(self.path, "a", buffering=1, opener=_private)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
