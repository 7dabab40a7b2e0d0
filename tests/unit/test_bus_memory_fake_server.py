"""The IPN bus reader holds no netmap line while it waits for the next one,
against a FAKE LocalAPI on a unix socket (a narrow unit test of the client;
tailscaled itself is exercised by the tests that run it).

A bus line with a netmap is the size of the tailnet. With every proxy seeing
199 peers, 200 watchers each keeping their last such line alive (the chunk and
the line split from it, bound to generator locals across the await) held about
85 MiB in the supervisor: its RSS at rest at 200 proxies was 135 MiB, and 50
once they were released (scripts/bench --only scale --sizes 200 --peers all)."""
from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
from pathlib import Path

import pytest

from supervisor import tailscale as ts

MIB = 1 << 20


def netmap_line(peers: int) -> bytes:
    """A netmap-only Notify as 1.96.4 writes it, about 1 KiB per peer."""
    nm = {"SelfNode": {"ID": 1}, "Peers": [{"ID": i, "Name": f"peer-{i}.ts.net.", "Hostinfo": {"x": "y" * 900}}
                                           for i in range(peers)]}
    return b'{"Version":"1.96.4","NetMap":' + json.dumps(nm).encode() + b"}\n"


STATE_LINE = b'{"Version":"1.96.4","State":6}\n'


@pytest.mark.parametrize("split", [1, 3], ids=["one chunk", "three chunks"])
@pytest.mark.parametrize("then_state", [False, True], ids=["netmap last", "state after netmap"])
def test_a_waiting_bus_watcher_holds_no_netmap(tmp_path: Path, split: int, then_state: bool):
    """After a 4 MiB netmap line (in one chunk or three) the watcher waits for the
    next line holding under 0.5 MiB of traced memory (it held 2 lines' worth)."""

    async def main() -> tuple[int, list[ts.BusEvent]]:
        sent = asyncio.Event()
        release = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            line = netmap_line(4 * 1024) + (STATE_LINE if then_state else b"")
            step = -(-len(line) // split)
            for i in range(0, len(line), step):
                part = line[i:i + step]
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            del line, part
            await writer.drain()
            sent.set()
            await release.wait()
            writer.write(b"0\r\n\r\n")
            writer.close()

        sock = tmp_path / "ts.sock"
        server = await asyncio.start_unix_server(handle, path=str(sock))
        api = ts.LocalAPI(sock)
        events: list[ts.BusEvent] = []
        want = 2 if then_state else 1
        got = asyncio.Event()

        async def watch() -> None:
            async for ev in api.watch_bus():
                events.append(ev)
                if len(events) == want:
                    got.set()

        tracemalloc.start()
        try:
            task = asyncio.create_task(watch())
            async with asyncio.timeout(30):
                await sent.wait()
                await got.wait()
            # the watcher goes back to waiting for the next chunk at once; a version
            # that keeps the line alive while it waits never gets under the bound
            deadline = time.monotonic() + 5.0
            while True:
                gc.collect()
                held = tracemalloc.get_traced_memory()[0]
                if held < MIB // 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            release.set()
            async with asyncio.timeout(30):
                await task
            return held, events
        finally:
            tracemalloc.stop()
            api.close()
            server.close()

    held, events = asyncio.run(main())
    assert events[0].netmap  # dropped undecoded, as a netmap-only line is
    if then_state:
        assert events[1].state == ts.BackendState.RUNNING
    assert held < MIB // 2, f"{held / MIB:.1f} MiB held while waiting"
