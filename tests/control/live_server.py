"""A ControlServer running on its own event loop in a background thread, for
Hypothesis suites: each example is a plain function that talks to the server
over loopback with its own short-lived loop, while the server (and any
long-lived bystander client) keeps running across examples.

    with LiveControl(tmp_dir) as live:
        live.run(some_coroutine())          # on the server's loop
        asyncio.run(client_code(live.url))  # on a loop of the caller's own
        live.assert_healthy()               # nothing reached the loop's exception
                                            # handler, no ERROR log line

Anything that reaches the server loop's exception handler ("Task exception was
never retrieved", a callback that raised) and every ERROR record from the
`supervisor.control` loggers (log.exception: a bug, not bad input) is recorded.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from supervisor.control.server import ControlServer

T = TypeVar("T")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


class LiveControl:
    def __init__(self, data_dir: Path, **opts: Any) -> None:
        self.data_dir = data_dir
        self.opts = opts
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self._logs = _Collect()
        self._thread = threading.Thread(target=self._serve, name="live-control", daemon=True)
        self.srv: ControlServer

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.loop.run_forever()

    def __enter__(self) -> "LiveControl":
        self._thread.start()
        logging.getLogger("supervisor.control").addHandler(self._logs)

        async def start() -> ControlServer:
            srv = ControlServer(self.data_dir, **self.opts)
            await srv.start()
            return srv
        self.srv = self.run(start())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.run(self.srv.stop())
        finally:
            logging.getLogger("supervisor.control").removeHandler(self._logs)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    @property
    def url(self) -> str:
        return self.srv.url

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def admin(self, op: str, **args: Any) -> Any:
        async def call() -> Any:
            return self.srv.admin(op, **args)
        return self.run(call())

    def clear(self) -> None:
        self.loop_errors.clear()
        self._logs.records.clear()

    def assert_healthy(self) -> None:
        """No exception reached the loop's handler and nothing was logged as an error."""
        assert not self.loop_errors, f"reached asyncio's exception handler: {self.loop_errors}"
        assert not self._logs.records, f"logged as an internal error: {self._logs.records}"


_KEY = {"Key": r"nodekey:[0-9a-f]{64}", "Machine": r"mkey:[0-9a-f]{64}", "DiscoKey": r"discokey:[0-9a-f]{64}"}
_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def assert_node_json_decodes_in_go(node: dict[str, Any]) -> None:
    """A netmap Node as tailcfg.Node would decode it: the types tailscaled needs, so one
    node's odd request never breaks its peers' map polls. Strict JSON (no NaN) too."""
    json.dumps(node, allow_nan=False)
    for field, pattern in _KEY.items():
        assert isinstance(node[field], str) and re.fullmatch(pattern, node[field]), (field, node[field])
    assert type(node["ID"]) is int and type(node["HomeDERP"]) is int and 0 <= node["HomeDERP"] < 2**31
    assert type(node["User"]) is int and 0 < node["User"] < 2**53  # tailcfg.UserID
    cap_map = node.get("CapMap", {})  # tailcfg.NodeCapMap: capability -> null or a list
    assert isinstance(cap_map, dict) and all(isinstance(k, str) and v is None for k, v in cap_map.items())
    for field in ("Addresses", "AllowedIPs"):
        for prefix in node[field]:
            ipaddress.ip_network(prefix)
    assert isinstance(node["Endpoints"], list) and all(isinstance(e, str) for e in node["Endpoints"])
    assert isinstance(node["Tags"], list) and all(isinstance(t, str) for t in node["Tags"])
    for field in ("KeyExpiry", "Created"):
        assert re.fullmatch(_TIME, node[field]), (field, node[field])
    assert node["LastSeen"] is None or re.fullmatch(_TIME, node["LastSeen"])
    hostinfo = node["Hostinfo"]
    assert isinstance(hostinfo, dict)
    for field, value in hostinfo.items():
        if field == "Services":
            assert all(isinstance(s.get("Proto"), str) and type(s.get("Port")) is int for s in value)
        else:
            assert isinstance(value, str), (field, value)
