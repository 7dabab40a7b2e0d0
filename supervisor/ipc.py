"""The running supervisor's control socket: DATA/supervisor.sock, mode 0600.

One JSON request line, one JSON answer line. The CLI (`status`, and later
`restart`/`stop`/...) is a client; the fleet registers the handlers.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SOCKET_NAME = "supervisor.sock"
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class NotRunning(Exception):
    pass


class IPCServer:
    def __init__(self, data_dir: Path, handlers: dict[str, Handler]):
        self.path = data_dir / SOCKET_NAME
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path), limit=1 << 20)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                req = json.loads(line)
                handler = self.handlers.get(req.get("cmd")) if isinstance(req, dict) else None
                if handler is None:
                    answer = {"ok": False, "error": f"unknown command {req.get('cmd') if isinstance(req, dict) else req!r}"}
                else:
                    answer = await handler(req)
            except ValueError:
                answer = {"ok": False, "error": "request is not a JSON line"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def call(data_dir: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Blocking client for the CLI."""
    path = data_dir / SOCKET_NAME
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"no ts-supervisor is running with data dir {data_dir}") from None
    with s:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)
