"""Fuzz what tailscaled says: IPN bus lines, LocalAPI answers, stderr lines
and exit tails, through parsing and classification.

The property: no exception escapes the pure functions; a bad bus line is one
transient verdict (one line, never a crash or a recovery); a bad LocalAPI
answer is a LocalAPIError; reasons are single lines.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor import policy, procs
from supervisor import tailscale as ts
from supervisor.states import Signal

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)

# Notify-shaped objects: the real keys, with values of any type.
notify_like = st.fixed_dictionaries({}, optional={
    "State": json_values | st.integers(-3, 9),
    "ErrMessage": json_values | st.sampled_from(["invalid key: API key does not exist", ""]),
    "BrowseToURL": json_values,
    "LoginFinished": json_values,
    "Version": json_values,
    "Health": json_values | st.fixed_dictionaries({"Warnings": st.dictionaries(
        st.sampled_from(["login-state", "state-store-health", "x"]) | st.text(max_size=8),
        json_values | st.fixed_dictionaries({"Text": json_values | st.text(max_size=80)}),
        max_size=3)}),
})


def _check(verdicts: list[policy.Verdict]) -> None:
    for v in verdicts:
        assert v.signal is None or isinstance(v.signal, Signal)
        assert "\n" not in v.reason


@given(st.binary(max_size=300))
@example(b"not json")
@example(b"[1, 2, 3]")
@example(b'{"State": 99}')
@example(b'{"State": "Running"}')
@example(b'{"Health": {"Warnings": {"login-state": ["x"]}}}')
@example(b'{"Health": {"Warnings": []}}')
@example(b"[" * 5000)
@example(b'{"ErrMessage": 7, "BrowseToURL": {}}')
def test_any_bus_line_is_one_event_or_one_transient_line(line):
    ev = ts.BusEvent.parse_line(line)
    verdicts = policy.from_bus(ev)
    _check(verdicts)
    if ev.malformed:
        assert [v.signal for v in verdicts] == [None]


@given(notify_like)
def test_any_notify_shape_classifies(n):
    ev = ts.BusEvent.parse(n)
    _check(policy.from_bus(ev))
    assert ev.state is None or isinstance(ev.state, ts.BackendState)


@given(json_values | notify_like)
@example({"BackendState": "Running", "Self": [], "TailscaleIPs": "100.64.0.1"})
@example({"BackendState": "Bogus"})
@example({"BackendState": "NeedsLogin", "Self": {"Expired": "yes", "KeyExpiry": 5}})
def test_any_status_answer_parses_or_is_a_localapi_error(s):
    try:
        status = ts.NodeStatus.parse(s)
    except ts.LocalAPIError as e:
        assert "\n" not in str(e)
        return
    v = policy.from_needs_login(status)
    assert v is None or "\n" not in v.reason
    assert all(isinstance(ip, str) for ip in status.tailscale_ips)


@given(json_values)
@example({"TCP": {"80": {}, "x": 1, "99999": {}}, "Foreground": {"s": {"TCP": {"443": None}}}})
@example({"Foreground": [1]})
def test_any_serve_config_gives_ports(cfg):
    ports = ts.serve_ports(cfg)
    assert all(0 < p < 65536 for p in ports)


@given(st.text(max_size=400))
@example("2026/11/25 03:42:04 Received error: PollNetMap: initial fetch failed 404: node not found")
@example("\x00\udcff" * 50)
def test_any_stderr_line_classifies(line):
    v = policy.from_stderr(line)
    assert v is None or "\n" not in v.reason


@given(st.integers(-300, 300) | st.none(), st.lists(st.text(max_size=200), max_size=8))
def test_any_exit_tail_is_one_verdict(rc, tail):
    v = policy.from_exit(rc, tail)
    assert v.signal in (Signal.CRASH, Signal.CORRUPT_STATE) and "\n" not in v.reason


@given(st.lists(st.binary(max_size=3000), max_size=6))
@example([b"x" * 200_000, b"\nnext line\n"])
def test_child_output_is_read_whatever_its_shape(chunks):
    """A child's output never stops the reader: overlong lines are cut, not fatal."""
    async def main() -> list[str]:
        reader = asyncio.StreamReader(limit=1024)
        for c in chunks:
            reader.feed_data(c)
        reader.feed_eof()
        return [line async for line in procs.lines(reader, limit=2048)]
    out = asyncio.run(main())
    assert sum(len(x) for x in out) <= sum(len(c) for c in chunks) + len(out)


# -- the LocalAPI client against a socket that answers anything ------------------

http_answers = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda code, headers, body: (f"HTTP/1.1 {code} X\r\n".encode() + headers + b"\r\n" + body),
              st.integers(0, 999), st.sampled_from([
                  b"", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Content-Length: x\r\n",
                  b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n"]),
              st.binary(max_size=200)),
)


@settings(max_examples=60)
@given(http_answers)
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1,")
@example(b"HTTP/1.1 200 OK\r\n\r\n" + b"[" * 3000)
def test_any_localapi_answer_is_a_value_or_a_localapi_error(answer):
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            sock = Path(d) / "s.sock"

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
                writer.close()
            server = await asyncio.start_unix_server(serve, str(sock))
            try:
                api = ts.LocalAPI(sock)
                try:
                    await api.status()
                except (ts.LocalAPIError, OSError, asyncio.IncompleteReadError):
                    pass
                async for ev in api.watch_bus():
                    assert isinstance(ev, ts.BusEvent)
            except (ts.LocalAPIError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                server.close()
                await server.wait_closed()
    asyncio.run(main())


def test_a_good_bus_line_still_parses():
    ev = ts.BusEvent.parse_line(json.dumps({"State": 6}).encode())
    assert ev.state is ts.BackendState.RUNNING and not ev.malformed
