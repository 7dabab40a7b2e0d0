"""Fuzz the metrics listener (/metrics, /healthz): any bytes on a connection get
one well-formed answer or none, never an exception. Helpers live with the
unit tests in tests/unit/test_healthz.py."""
from __future__ import annotations

import json

from hypothesis import example, given

from supervisor.metrics import Refused, parse_head
from tests.unit.test_healthz import _heads, _serve_bytes, split


@given(_heads)
@example(b"GET /healthz/\xff\xfe HTTP/1.1\r\n\r\n")
@example(b"GET /healthz/%0d%0aX:%20y HTTP/1.1\r\n\r\n")
def test_any_bytes_get_one_well_formed_answer_or_none(data):
    """Property: no exception escapes; the answer is empty (nothing was sent) or one
    HTTP/1.1 response whose Content-Length is its body; JSON bodies parse; a 4xx/5xx
    for anything but a well-formed GET/HEAD of a known path."""
    out = _serve_bytes(data)
    if not out:
        assert not data.strip()
        return
    status, headers, body = split(out)
    assert out.isascii() and headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body) or data.startswith(b"HEAD ")
    if headers["Content-Type"] == "application/json" and body:
        assert isinstance(json.loads(body), dict)
    if b"\r\n\r\n" not in data:
        assert status == 400  # EOF before the blank line
        return
    try:
        method, path = parse_head(data)
    except Refused as e:
        assert status == e.status
        return
    if status in (200, 503) and path != "/metrics":
        assert path in ("/healthz", "/healthz/app", "/healthz/d")

