"""Outbound HTTP that can neither leak a secret nor hold the fleet: shared by
webhooks (notify.py) and the Tailscale API client (tsapi.py).

- `opener` refuses redirects: a body or credential goes to the configured URL
  or nowhere (urllib would otherwise follow a 3xx to any host).
- `in_daemon_thread` runs a blocking urllib call in a daemon thread of its own,
  so a receiver that keeps a request alive (cancelled by its deadline, still
  blocking its thread) can neither starve the default executor nor delay exit.
- `why` is one short line for a transport failure that quotes neither the URL
  nor the server's bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # a 3xx is an error: what we send goes to the URL configured, or nowhere


opener = urllib.request.build_opener(_NoRedirects)


def why(e: BaseException, timeout: float) -> str:
    """One short line for a failed request: "HTTP 502", "no answer within 5 s",
    "TLS: CERTIFICATE_VERIFY_FAILED", "Connection refused", or the exception's
    type name (BadStatusLine, RemoteDisconnected, InvalidURL, ...: their text may
    quote the URL or the server)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or type(e).__name__}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror  # "Connection refused", "Name or service not known"
    return type(e).__name__


async def in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "http") -> T:
    """fn(*args) in a daemon thread of its own; its result or exception."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            outcome = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await fut
