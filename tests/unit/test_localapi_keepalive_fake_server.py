"""LocalAPI's kept-alive connection, against a FAKE HTTP/1.1 server on a unix
socket (a narrow unit test of the client's framing; the real tailscaled is
exercised by the tests that run it)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor import tailscale as ts


class FakeLocalAPI:
    """Answers every request; `close_after` answers per connection, then closes it."""

    def __init__(self, bodies: list[tuple[int, bytes, bool]], close_after: int = 0):
        self.bodies = bodies  # (status, body, chunked), cycled
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.requests.append(head)
                status, body, chunked = self.bodies[len(self.requests) % len(self.bodies)]
                if status == 204:
                    out = b"HTTP/1.1 204 No Content\r\n\r\n"
                elif chunked:
                    out = (f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                           + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
                else:
                    out = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                writer.write(out)
                await writer.drain()
                served += 1
                if b"Connection: close" in head or served == self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _run(tmp_path: Path, fake: FakeLocalAPI, keep_alive: bool, n: int) -> list[bytes]:
    sock = tmp_path / "ts.sock"
    server = await asyncio.start_unix_server(fake.handle, path=str(sock))
    api = ts.LocalAPI(sock, keep_alive=keep_alive)
    try:
        out = []
        for _ in range(n):
            out.append(await api.request("GET", "/localapi/v0/status?peers=false"))
            await asyncio.sleep(0.01)  # let a closing server's FIN arrive first
        return out
    finally:
        api.close()
        server.close()


@pytest.mark.parametrize("bodies", [
    [(200, b'{"a":1}', False)],
    [(200, b'{"a":1}', True)],
    [(200, b'{"a":1}', True), (204, b"", False), (200, b"{}", False)],
])
def test_fake_server_kept_alive_gets_share_one_connection(tmp_path, bodies):
    fake = FakeLocalAPI(bodies)
    out = asyncio.run(_run(tmp_path, fake, keep_alive=True, n=6))
    assert fake.connections == 1
    assert len(out) == 6 and all(b"Connection: close" not in r for r in fake.requests)


def test_fake_server_closed_idle_connection_is_replaced(tmp_path):
    fake = FakeLocalAPI([(200, b'{"a":1}', True)], close_after=2)
    out = asyncio.run(_run(tmp_path, fake, keep_alive=True, n=5))
    assert out == [b'{"a":1}'] * 5
    assert fake.connections == 3


def test_fake_server_without_keep_alive_closes_each(tmp_path):
    fake = FakeLocalAPI([(200, b"{}", False)])
    asyncio.run(_run(tmp_path, fake, keep_alive=False, n=3))
    assert fake.connections == 3
    assert all(b"Connection: close" in r for r in fake.requests)


def test_fake_server_error_status_still_raises(tmp_path):
    fake = FakeLocalAPI([(500, b"boom", False)])
    with pytest.raises(ts.LocalAPIError) as e:
        asyncio.run(_run(tmp_path, fake, keep_alive=True, n=2))
    assert e.value.status == 500
