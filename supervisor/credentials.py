"""A proxy's login credential: where the key for a `tailscale up` comes from,
and whether a recovery would have one today (readiness).

A proxy logs in with one of:
- a plain auth key (auth_key_file/_env): read at each login, as configured;
- a key the supervisor mints through the Tailscale v2 API (tsapi.Client) with
  an OAuth client, an API access token, or the embedded control's in-process
  token: single-use, preauthorized, the proxy's `ephemeral` and tags, a short
  expiry; deleted once `tailscale up` has finished. Minting only ever happens
  for a state dir that needs a login, so a healthy node never mints.

Readiness is what the table and `status --json` show: the credential kind and,
where an API credential can tell (GET /api/v2/tailnet/-/keys/{id}, facts §2),
the plain key's expiry with a warning under EXPIRY_WARNING, or that a one-off
key was already used. A warning is never a state and causes no action.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import tsapi
from supervisor.config import ProxyConfig
from supervisor.events import redact, register_secret

REUSABLE, ONE_OFF, OAUTH, TOKEN, AUTH_KEY = "reusable key", "one-off key", "oauth client", "api token", "auth key"
EXPIRY_WARNING = 14 * 86400   # seconds: a plain key closer than this to expiry is a warning
CHECK_PERIOD = 6 * 3600       # seconds between readiness checks of a proxy (and at its start)
RETRY_PERIOD = 600            # seconds until the next check when the API did not answer
MEMORY_NAME = "credential.json"  # in the proxy's data dir: keys used and keys warned about
MEMORY_LIMIT = 50             # key ids kept per list


class KeyUnavailable(Exception):
    """No key to log in with; str() is one line, secrets redacted."""


@dataclass(frozen=True)
class LoginKey:
    """The key for one `tailscale up`. `minted`: made by the supervisor for this
    login (delete it with `discard` once up has finished)."""

    secret: str = field(repr=False)
    key_id: str | None = None  # "kAbc123CNTRL" where the key's form tells (tsapi.key_id_of)
    minted: bool = False
    api: tsapi.Client | None = field(default=None, repr=False, compare=False)  # who minted it


def configured_kind(cfg: ProxyConfig) -> str:
    """The credential kind as far as the config tells, without asking an API:
    a plain key is "auth key" (reusable or one-off only the API knows)."""
    if cfg.has_auth_key:
        return AUTH_KEY
    return OAUTH if cfg.api_kind == "oauth" else TOKEN  # a token: configured, or the embedded control's


def mint_expiry(start_timeout: float) -> int:
    """Seconds a minted key lives: minutes, and always longer than one login
    may take (`tailscale up --timeout=start_timeout`)."""
    return max(300, math.ceil(start_timeout) + 60)


async def obtain(cfg: ProxyConfig, api: tsapi.Client | None, *, expiry_seconds: int) -> LoginKey:
    """The key for a login: the configured plain key, else one minted through
    `api` (single-use, preauthorized, the proxy's ephemeral flag and tags).
    Raises KeyUnavailable with the reason (unreadable key, API error)."""
    if cfg.has_auth_key:
        try:
            secret = await asyncio.to_thread(cfg.read_auth_key)
        except (LookupError, OSError) as e:
            raise KeyUnavailable(redact(f"cannot read the auth key: {e}")) from None
        if not secret:
            raise KeyUnavailable("the auth key is empty")
        register_secret(secret)
        return LoginKey(secret, tsapi.key_id_of(secret))
    if api is None:
        raise KeyUnavailable("no auth key and no API credential to mint one with")
    try:
        key = await api.create_key(reusable=False, ephemeral=cfg.ephemeral, preauthorized=True,
                                   tags=cfg.tags, expiry_seconds=expiry_seconds,
                                   description=f"ts-supervisor {cfg.name}"[:50])
    except tsapi.APIError as e:
        raise KeyUnavailable(f"cannot mint an auth key: {e}") from None
    return LoginKey(key.key, key.id, minted=True, api=api)


def describe_minted(cfg: ProxyConfig, key: LoginKey, expiry_seconds: int) -> str:
    """The event line for a minted key: its id and capabilities, never the secret."""
    tags = ", ".join(cfg.tags) if cfg.tags else "no tags"
    return (f"minted single-use auth key {key.key_id} for this login (preauthorized, "
            f"{'ephemeral' if cfg.ephemeral else 'not ephemeral'}, {tags}; expires in "
            f"{expiry_seconds // 60} min)")


async def discard(key: LoginKey) -> str | None:
    """Delete a minted key, through the client that minted it, once its login is
    over (it is single-use: spent, or of no further use). None when done or
    nothing to do, else the one-line reason."""
    if not key.minted or key.api is None or not key.key_id:
        return None
    try:
        await key.api.delete_key(key.key_id)
    except tsapi.APIError as e:
        if e.not_found:
            return None  # already gone
        return f"could not delete the single-use auth key {key.key_id}: {e}"
    return None


# -- readiness ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """Whether a login (a recovery's, say) would have a key today.
    `kind`: REUSABLE, ONE_OFF, OAUTH, TOKEN or AUTH_KEY (a plain key the API
    cannot describe); `expires`: the plain key's expiry (epoch seconds) where
    the API tells; `warning`: one line, "" when none; `expiring`: the warning
    is about the expiry (one note per key)."""

    kind: str
    expires: float | None = None
    warning: str = ""
    key_id: str | None = None
    expiring: bool = False


def _left(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{int(seconds // 86400)} days"
    if seconds >= 2 * 3600:
        return f"{int(seconds // 3600)} hours"
    return f"{max(1, int(seconds // 60))} min"


def assess(key: tsapi.Key, used: bool, now: float) -> Readiness:
    """A plain auth key as the API describes it (GET .../keys/{id}); `used`: this
    proxy has logged in with it. Pure; table-tested."""
    kind = REUSABLE if key.reusable else ONE_OFF
    base = Readiness(kind, key.expires, key_id=key.id)
    if key.revoked is not None:
        return Readiness(kind, key.expires, "auth key revoked", key.id)
    if key.expires is not None and key.expires <= now:
        return Readiness(kind, key.expires, "auth key expired", key.id, expiring=True)
    if kind == ONE_OFF and (used or key.invalid):
        return Readiness(kind, key.expires, "one-off key already used", key.id)
    if key.invalid:
        return Readiness(kind, key.expires, "auth key no longer valid", key.id)
    if key.expires is not None and key.expires - now < EXPIRY_WARNING:
        return Readiness(kind, key.expires, f"auth key expires in {_left(key.expires - now)}", key.id,
                         expiring=True)
    return base


async def check(cfg: ProxyConfig, api: tsapi.Client | None, used: set[str],
                now: float | None = None) -> tuple[Readiness, bool]:
    """Readiness of `cfg`'s login, asking `api` where it can tell:
    (readiness, answered). `answered` is False when the API or the key file
    did not answer (check again sooner). `used`: key ids this proxy has
    logged in with. Never raises for an API or file problem."""
    now = time.time() if now is None else now
    kind = configured_kind(cfg)
    if not cfg.has_auth_key:
        if api is None:
            return Readiness(kind), True
        try:
            await api.devices()  # the credential works (a revoked OAuth client is refused here)
        except tsapi.APIError as e:
            return Readiness(kind, warning=f"API credential check failed: {e}"), False
        return Readiness(kind), True
    try:
        secret = await asyncio.to_thread(cfg.read_auth_key)
    except (LookupError, OSError) as e:
        return Readiness(kind, warning=redact(f"cannot read the auth key: {e}")), False
    register_secret(secret)
    key_id = tsapi.key_id_of(secret)
    if key_id is None or api is None:  # a key of another form, or nothing to ask
        return Readiness(kind, key_id=key_id), True
    try:
        key = await api.get_key(key_id)
    except tsapi.APIError as e:
        if e.not_found:
            return Readiness(kind, warning="auth key not found on the tailnet (deleted?)", key_id=key_id), True
        return Readiness(kind, warning=f"cannot check the auth key: {e}", key_id=key_id), False
    return assess(key, key_id in used, now), True


class KeyMemory:
    """proxies/NAME/credential.json: the auth key ids this proxy logged in with
    (`used`) and those it has warned about (`warned`), kept across restarts,
    newest last, MEMORY_LIMIT each. Ids only, never a secret. A damaged or
    missing file is empty; a full disk loses an update, never the proxy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.used: list[str] = []
        self.warned: list[str] = []
        try:
            raw = json.loads(path.read_text())
            for name in ("used", "warned"):
                ids = raw.get(name) if isinstance(raw, dict) else None
                if isinstance(ids, list):
                    setattr(self, name, [i for i in ids if isinstance(i, str) and i.isprintable()
                                         and len(i) <= 64][-MEMORY_LIMIT:])
        except (OSError, ValueError, RecursionError):
            pass

    def add(self, name: str, key_id: str) -> bool:
        """Remember `key_id` in list `name`; True if it was new (and saved)."""
        ids: list[str] = getattr(self, name)
        if key_id in ids:
            return False
        ids.append(key_id)
        del ids[:-MEMORY_LIMIT]
        self._save()
        return True

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"used": self.used, "warned": self.warned}, f)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
