"""The `control` fixture: a real embedded ControlServer on its own event-loop thread.

Tests are synchronous, so the server runs in a daemon thread that owns its
loop; every admin call is marshalled onto that loop. `stop()`/`start()` keep
the port, so an outage test can bring the same control back.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.control.server import ControlServer


class ControlThread:
    """A ControlServer running in a thread, with a synchronous admin API."""

    def __init__(self, data_dir: Path, **kwargs: Any) -> None:
        self.data_dir = data_dir
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="control")
        self.thread.start()
        self.server: ControlServer | None = None
        self.port = 0
        self.start()

    def _run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        async def go() -> ControlServer:
            server = ControlServer(self.data_dir, port=self.port, **self.kwargs)
            await server.start()
            return server
        self.server = self._run(go())
        self.port = self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self._run(self.server.stop())
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self, op: str, **args: Any) -> Any:
        async def call() -> Any:
            assert self.server is not None, "control is stopped"
            return self.server.admin(op, **args)
        return self._run(call())

    def create_key(self, *, reusable: bool = False, ephemeral: bool = False,
                   expiry: float | None = 3600.0, tags: list[str] | None = None,
                   proxy: bool = False) -> dict[str, Any]:
        """`proxy`: the key's nodes count as the supervisor's proxies (the peers policy)."""
        return self.admin("create_key", reusable=reusable, ephemeral=ephemeral,
                          expiry=expiry, tags=tags or [], proxy=proxy)

    def nodes(self) -> list[dict[str, Any]]:
        return self.admin("list_nodes")

    def node_named(self, hostname: str) -> dict[str, Any]:
        found = [n for n in self.nodes() if n["hostname"] == hostname]
        assert len(found) == 1, f"want one node {hostname!r}, control has {self.nodes()}"
        return found[0]

    def events(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self.admin("events", since=since)

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                   what: str, since: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events(since):
                if pred(ev):
                    return ev
            if time.monotonic() > deadline:
                raise AssertionError(f"control saw no {what} within {timeout}s")
            time.sleep(0.02)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlThread]:
    """A fresh control with ephemeral nodes reaped at once (no race with restarts)."""
    c = ControlThread(tmp_path / "control", ephemeral_reap_after=0.0)
    yield c
    c.close()
