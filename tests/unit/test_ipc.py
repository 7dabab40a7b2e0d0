"""The supervisor's control socket: 0600, one JSON line each way, clear errors."""
import asyncio
import os
import stat
import threading

import pytest

from supervisor import ipc


def test_status_round_trip_and_socket_mode(tmp_path):
    ready = threading.Event()

    async def handler(req):
        return {"ok": True, "echo": req}

    loop = asyncio.new_event_loop()
    server = ipc.IPCServer(tmp_path, {"status": handler})

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(5)
    try:
        mode = stat.S_IMODE(os.stat(tmp_path / ipc.SOCKET_NAME).st_mode)
        assert mode == 0o600
        assert ipc.call(tmp_path, "status", x=1) == {"ok": True, "echo": {"cmd": "status", "x": 1}}
        assert ipc.call(tmp_path, "nope")["error"].startswith("unknown command")
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_not_running_is_a_clear_error(tmp_path):
    with pytest.raises(ipc.NotRunning, match="no ts-supervisor is running"):
        ipc.call(tmp_path, "status")
