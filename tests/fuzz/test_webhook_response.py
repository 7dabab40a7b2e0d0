"""Fuzz what a webhook receiver answers: any bytes, as a reply to the POST.

A loopback receiver (127.0.0.1 only) answers every delivery for proxy "one"
with Hypothesis' bytes (status lines, headers, bodies, truncations, garbage),
then closes; it answers proxy "two" with a plain 200. Property: the delivery of
"one" either succeeds on its first attempt with no note, or takes every attempt
and ends in exactly one `webhook_failed` note (one line, no URL); either way the
delivery task keeps running and delivers "two" afterwards.
"""
from __future__ import annotations

import asyncio

from hypothesis import example, given, strategies as st

from supervisor import notify
from supervisor.notify import Notifier, Webhook
from tests.unit.test_notify import OK, Receiver, failed, until

_token = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
                 min_size=1, max_size=12).map(str.encode)
_status_line = st.one_of(
    st.builds(lambda v, code, reason: v + b" " + code + b" " + reason + b"\r\n",
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b"ICY", b"http/1.1", b""]),
              st.one_of(st.integers(0, 1000).map(lambda n: str(n).encode()),
                        st.sampled_from([b"200", b"204", b"302", b"500", b"2OO", b"-1", b""])),
              st.binary(max_size=20)),
    st.binary(max_size=40),
)
_header = st.one_of(
    st.builds(lambda k, v: k + b": " + v + b"\r\n", _token, st.binary(max_size=30)),
    st.sampled_from([b"Content-Length: 5\r\n", b"Content-Length: -3\r\n", b"Content-Length: x\r\n",
                     b"Transfer-Encoding: chunked\r\n", b"Location: /loop\r\n",
                     b"Connection: close\r\n", b" folded\r\n", b"X: " + b"a" * 70000 + b"\r\n"]),
)
_response = st.one_of(
    st.builds(lambda s, hs, end, body: s + b"".join(hs) + end + body,
              _status_line, st.lists(_header, max_size=6),
              st.sampled_from([b"\r\n", b"\n", b""]), st.binary(max_size=40)),
    st.binary(max_size=200),
    st.builds(lambda n: b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * n + b"\r\n", st.integers(90, 120)),
)


@given(answer=_response)
@example(answer=b"garbage\r\n\r\n")                       # BadStatusLine: the reported crash
@example(answer=b"")                                       # RemoteDisconnected
@example(answer=b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort")   # truncated body
@example(answer=b"HTTP/1.1 500 Oops\r\n\r\n")
@example(answer=b"HTTP/1.1 302 Found\r\nLocation: /one/token-1\r\n\r\n")  # a redirect loop
def test_any_answer_costs_at_most_one_delivery(answer: bytes) -> None:
    async def go() -> None:
        notes: list[tuple[str, str]] = []
        async with Receiver(lambda path, body: answer if body["proxy"] == "one" else OK) as rx:
            n = Notifier((Webhook(rx.url + "/one/token-1"),), lambda k, w: notes.append((k, w)),
                         backoff=0, timeout=1)
            task = asyncio.create_task(n.run())
            try:
                n.on_event(failed("one"))
                n.on_event(failed("two"))
                await until(lambda: rx.got("/one/token-1", "two"), 15, "the next event delivered")
                tries = rx.got("/one/token-1", "one")
                if notes:
                    assert tries == notify.ATTEMPTS and len(notes) == 1
                    kind, why = notes[0]
                    assert kind == "webhook_failed" and why.startswith("webhook #1: gave up on one failed")
                    assert "token-1" not in why and "127.0.0.1" not in why and "\n" not in why
                else:
                    assert tries == 1
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    asyncio.run(go())
