"""The running supervisor's control socket: DATA/supervisor.sock, mode 0600.

One JSON request line (an object with a string "cmd", at most MAX_REQUEST
bytes), one JSON answer line ({"ok": bool, "error"?: str, ...}). The CLI
(`status`, `restart`, `stop`, ...) is a client; the fleet registers the
handlers, and every server answers `process` itself (process_info: what a
soak samples to see a leak). Whatever a client sends costs that one connection: the server
answers with one error line (or just closes) and keeps serving the others.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from supervisor import paths
from supervisor.events import redact_json

SOCKET_NAME = "supervisor.sock"
RECORD_NAME = "ipc.json"  # {"socket": PATH}: where the socket is when DATA/supervisor.sock is too long
MAX_REQUEST = 64 << 10   # bytes, newline included
MAX_ANSWER = 16 << 20    # bytes the client reads before it gives up on an answer
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class IPCError(ConnectionError):
    """The supervisor's answer could not be had or read (str: one line, the reason).
    A ConnectionError, so callers that treat OSError as "no answer" keep doing so."""


class NotRunning(IPCError):
    """Nothing listens on DATA/supervisor.sock."""


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of a unix socket connection's peer, as the kernel recorded it at connect
    (SO_PEERCRED, Linux: struct ucred is three C ints); None if it cannot be had."""
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", raw)[1]


async def process_info(req: dict[str, Any]) -> dict[str, Any]:
    """The `process` command: the serving process itself, as only it can see it.
    {"ok", "pid", "tasks": asyncio tasks not yet done on its loop (asyncio.all_tasks),
    "fds": open file descriptors (entries of /proc/self/fd, Linux)}. scripts/soak
    samples it every minute: a count that keeps growing is a leak."""
    try:
        fds: int | None = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError:
        fds = None
    return {"ok": True, "pid": os.getpid(), "tasks": len(asyncio.all_tasks()), "fds": fds}


class IPCServer:
    request_timeout = 10.0  # seconds a client has to send its request line

    def __init__(self, data_dir: Path, handlers: dict[str, Handler]):
        self.data_dir = data_dir
        self.path = paths.supervisor_socket(data_dir)
        self.handlers = {"process": process_info, **handlers}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.parent != self.data_dir:  # the data dir's path is too long for a socket
            paths.ensure_runtime_dir(self.data_dir)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        record = self.data_dir / RECORD_NAME
        if self.path.parent == self.data_dir:
            record.unlink(missing_ok=True)
        else:  # the runtime dir depends on our uid and environment: say where it is
            tmp = record.with_name(f".{RECORD_NAME}.tmp")
            tmp.write_text(json.dumps({"socket": str(self.path), "pid": os.getpid()}))
            tmp.replace(record)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
        (self.data_dir / RECORD_NAME).unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: read one line, write one answer line, close. Never raises
        (but for cancellation): a client that sends nothing and leaves gets no answer.
        Only the supervisor's own user and root are served, by the peer uid the kernel
        reports (SO_PEERCRED), whatever a NAS's ACLs make of the socket's and data dir's
        modes (as the embedded control's admin socket)."""
        try:
            answer = await self._answer(reader, _peer_uid(writer))
            if answer is not None:
                writer.write(json.dumps(redact_json(answer)).encode() + b"\n")  # no secret leaves
                await writer.drain()
        except (OSError, RuntimeError):
            pass  # the client went away before its answer
        finally:
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass

    async def _answer(self, reader: asyncio.StreamReader, uid: int | None) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self.request_timeout):
                line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            return _error(f"request is over {MAX_REQUEST >> 10} KiB")
        except asyncio.IncompleteReadError as e:  # EOF before a newline: the request is what came
            line = e.partial
            if not line:
                return None
        except TimeoutError:
            return _error(f"no request line within {self.request_timeout:g} s")
        if uid not in (0, os.geteuid()):  # read first, so the client hears why, not EPIPE
            return _error(f"uid {uid} may not use this supervisor (only its own user and root)")
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
            return _error("request is not a JSON line")
        if not isinstance(req, dict):
            return _error("request must be a JSON object")
        cmd = req.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            shown = repr(cmd)
            return _error(f"unknown command {shown[:60] + '...' if len(shown) > 60 else shown}"
                          f" (known: {', '.join(sorted(self.handlers))})")
        try:
            answer = await handler(req)
            json.dumps(answer)  # an answer that cannot be sent is the handler's failure
        except Exception as e:  # a bad argument must not end the connection without a word
            return _error(f"{cmd} failed: {type(e).__name__}")
        return answer


def socket_for(data_dir: Path) -> Path:
    """The running supervisor's socket as a CLI finds it: DATA/supervisor.sock when that
    fits in a socket address; else the path the supervisor recorded in DATA/ipc.json,
    if a socket there belongs to the data dir's owner (the runtime dir depends on the
    user and environment: root's `status` would look in /run/ts-supervisor-H for a
    service that listens in /tmp/ts-supervisor-UID-H); else this user's runtime dir."""
    path = paths.supervisor_socket(data_dir)
    if path.parent == data_dir:
        return path
    try:
        recorded = Path(json.loads((data_dir / RECORD_NAME).read_text())["socket"])
        if os.lstat(recorded).st_uid == os.stat(data_dir).st_uid and paths.fits(recorded):
            return recorded
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return path


def call(data_dir: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Blocking client for the CLI: send {"cmd": cmd, **args}, return the answer object.

    Raises NotRunning if no supervisor listens, PermissionError if the socket is
    not ours, and IPCError (one line) for a request that cannot be sent or an
    answer that is missing, late, over MAX_ANSWER bytes, or not a JSON object.
    """
    path = socket_for(data_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise NotRunning(f"no ts-supervisor is running with data dir {data_dir}") from None
    except TimeoutError:
        s.close()
        raise IPCError(f"the supervisor accepted no connection within {timeout:g} s") from None
    except BaseException:
        s.close()
        raise
    try:
        request = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    except (TypeError, ValueError) as e:
        raise IPCError(f"request cannot be sent: {e}") from None
    with s:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused it early (too long, say); its answer says why
        except TimeoutError:
            raise IPCError(f"the supervisor took no request within {timeout:g} s") from None
        buf = b""
        try:
            while not buf.endswith(b"\n") and len(buf) <= MAX_ANSWER:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise IPCError(f"no answer from the supervisor within {timeout:g} s") from None
        except OSError as e:
            raise IPCError(f"the connection to the supervisor broke: {e.strerror or e}") from None
    if len(buf) > MAX_ANSWER:
        raise IPCError(f"the supervisor's answer is over {MAX_ANSWER >> 20} MiB")
    if not buf.strip():
        raise IPCError("the supervisor closed the connection without an answer")
    try:
        answer = json.loads(buf)
    except (ValueError, RecursionError):
        raise IPCError("the supervisor's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise IPCError("the supervisor's answer is not a JSON object")
    return answer
