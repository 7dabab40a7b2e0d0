"""Upstream probes against real sockets on 127.0.0.1 (and unix sockets), the
exception -> result table, and how the metrics show a result.

A result is what the operator reads in the table, `status --json` and the
metrics, so these tests assert the exact strings."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import ipaddress
import shutil
import socket
import ssl
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from supervisor import metrics, upstream
from supervisor.proxy import ProxySnapshot
from supervisor.upstream import MAX_LEN, Target, classify, parse, probe

# -- servers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server(handler, ssl_ctx=None, unix: Path | None = None):
    """A TCP server on 127.0.0.1 (or a unix socket at `unix`) running
    `handler(reader, writer)`; yields its port (or path)."""
    async def wrapped(reader, writer):
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()
    if unix:
        srv = await asyncio.start_unix_server(wrapped, path=str(unix))
    else:
        srv = await asyncio.start_server(wrapped, "127.0.0.1", 0, ssl=ssl_ctx)
    try:
        yield unix or srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


def http_answer(status: bytes = b"404 Not Found", seen: list | None = None, pieces: int = 1):
    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
        answer = b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n"
        step = -(-len(answer) // pieces)
        for i in range(0, len(answer), step):
            writer.write(answer[i:i + step])
            await writer.drain()
            await asyncio.sleep(0.01)
    return handler


async def silent(reader, writer):
    await asyncio.sleep(3600)


def banner(data: bytes):
    async def handler(reader, writer):
        writer.write(data)
        await writer.drain()
        await reader.read(1)  # until the prober hangs up
    return handler


async def hang_up(reader, writer):
    pass


def echo(connected: asyncio.Event):
    async def handler(reader, writer):
        connected.set()
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    return handler


async def reached(connected: asyncio.Event) -> bool:
    """Whether the server saw the probe's connection (within a deadline)."""
    async with asyncio.timeout(5):
        await connected.wait()
    return True


@contextlib.contextmanager
def closed_port():
    """A port on 127.0.0.1 that refuses: bound (so nobody else takes it), never listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def short_dir():
    """A directory whose socket paths stay under the 107-byte unix limit."""
    d = tempfile.mkdtemp(prefix="up-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# -- certificates ----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, ip_san: str | None = None, ca=None):
    """(cert, key): self-signed when `ca` is None, else signed by ca=(cert, key).
    With neither `ip_san` nor a CA it is the usual NAS admin UI certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_cert, issuer_key = ca if ca else (None, key)
    b = (x509.CertificateBuilder().subject_name(_name(cn))
         .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer_cert:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if ip_san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip_san))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256()), key


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def server_ctx(tmp_path: Path, cert, key) -> ssl.SSLContext:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cert.pem").write_bytes(pem(cert))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx


@pytest.fixture
def trust(tmp_path, monkeypatch):
    """Make `ca` the only trusted root for https:// probes (as if installed in the system store)."""
    def install(ca_cert):
        (tmp_path / "roots.pem").write_bytes(pem(ca_cert))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "roots.pem"))
        monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
        upstream._context.cache_clear()
    yield install
    upstream._context.cache_clear()


def run(coro):
    return asyncio.run(coro)


def one_line(result: str) -> bool:
    return isinstance(result, str) and result and "\n" not in result and len(result) <= MAX_LEN


# -- http:// ---------------------------------------------------------------------------------


def test_any_http_status_means_the_upstream_answers():
    async def go():
        out = {}
        for status in (b"200 OK", b"404 Not Found", b"500 Internal Server Error", b"401 Unauthorized"):
            async with server(http_answer(status)) as port:
                out[status] = await probe(f"http://127.0.0.1:{port}")
        return out
    assert set(run(go()).values()) == {"ok"}


def test_http_probe_asks_for_the_targets_path_like_serve_and_reads_a_split_answer():
    seen: list[bytes] = []

    async def go():
        async with server(http_answer(b"200 OK", seen, pieces=5)) as port:
            return await probe(f"http://127.0.0.1:{port}/jellyfin/web?x=1"), port
    result, port = run(go())
    assert result == "ok"
    request = seen[0].decode()
    assert request.startswith("HEAD /jellyfin/web?x=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in request


def test_serve_shorthands_bare_port_and_host_port_are_http():
    async def go():
        async with server(http_answer()) as port:
            return await probe(str(port)), await probe(f"127.0.0.1:{port}")
    assert run(go()) == ("ok", "ok")


def test_closed_port_is_refused():
    async def go():
        with closed_port() as port:
            return [await probe(f"{scheme}://127.0.0.1:{port}")
                    for scheme in ("http", "https", "https+insecure", "tcp")]
    assert run(go()) == ["refused"] * 4


def test_a_listener_that_never_answers_is_a_timeout_within_the_bound():
    async def go():
        async with server(silent) as port:
            t0 = time.monotonic()
            results = [await probe(f"{scheme}://127.0.0.1:{port}", timeout=0.3)
                       for scheme in ("http", "https", "https+insecure")]
            return results, time.monotonic() - t0
    results, elapsed = run(go())
    assert results == ["timeout"] * 3
    assert elapsed < 3 * 0.3 + 1.5, elapsed


def test_probes_run_side_by_side_without_blocking_the_loop():
    async def go():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        async with server(silent) as port:
            tick = asyncio.create_task(ticker())
            t0 = time.monotonic()
            results = await asyncio.gather(*(probe(f"http://127.0.0.1:{port}", timeout=0.5)
                                             for _ in range(30)))
            elapsed = time.monotonic() - t0
            tick.cancel()
        return results, elapsed, ticks
    results, elapsed, ticks = run(go())
    assert results == ["timeout"] * 30
    assert elapsed < 2.5, elapsed  # 30 probes of 0.5 s at once, not one after another
    assert ticks >= 10, ticks


def test_an_answer_that_is_not_http_says_what_it_was():
    async def go():
        async with server(banner(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")) as ssh, \
                server(hang_up) as closer, \
                server(banner(b"\x00\x01binary\xff")) as binary, \
                server(banner(b"\x15\x03\x03\x00\x02\x02\x46")) as tls_alert:
            return (await probe(f"http://127.0.0.1:{ssh}"), await probe(f"http://127.0.0.1:{closer}"),
                    await probe(f"http://127.0.0.1:{binary}"), await probe(f"http://127.0.0.1:{tls_alert}"),
                    tls_alert)
    ssh, closer, binary, tls_alert, port = run(go())
    assert ssh == "not HTTP: answered 'SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13'"
    assert closer == "not HTTP: closed without answering"
    assert binary == "not HTTP: answered '\\x00\\x01binary\\xff'"
    assert tls_alert == f"not HTTP: a TLS server — use https://127.0.0.1:{port}"


# -- https:// and https+insecure:// ------------------------------------------------------------


def test_self_signed_https_upstream_says_use_https_insecure(tmp_path):
    """The NAS admin UI case: CN=127.0.0.1, no IP SAN. serve's Go client 502s
    every request; the probe names the fix, and https+insecure:// is ok."""
    cert, key = make_cert("127.0.0.1")
    ctx = server_ctx(tmp_path, cert, key)

    async def go():
        async with server(http_answer(b"200 OK"), ssl_ctx=ctx) as port:
            return (port, await probe(f"https://127.0.0.1:{port}"),
                    await probe(f"https+insecure://127.0.0.1:{port}"))
    port, verified, insecure = run(go())
    assert verified == f"TLS: certificate not trusted — use https+insecure://127.0.0.1:{port}"
    assert insecure == "ok"


def test_https_is_verified_against_the_roots_and_the_ip(tmp_path, trust):
    ca = make_ca()
    trust(ca[0])
    good = server_ctx(tmp_path / "good", *make_cert("nas", ip_san="127.0.0.1", ca=ca))
    no_ip_san = server_ctx(tmp_path / "bad", *make_cert("127.0.0.1", ca=ca))  # CN only, as Go rejects

    async def go():
        async with server(http_answer(b"200 OK"), ssl_ctx=good) as g, \
                server(http_answer(b"200 OK"), ssl_ctx=no_ip_san) as b:
            return await probe(f"https://127.0.0.1:{g}"), await probe(f"https://127.0.0.1:{b}"), b
    trusted, untrusted, port = run(go())
    assert trusted == "ok"
    assert untrusted == f"TLS: certificate not trusted — use https+insecure://127.0.0.1:{port}"


async def bad_request(reader, writer):  # what a plain HTTP server says to a ClientHello
    await reader.read(1)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    await reader.read(1)


def test_https_against_a_plain_http_server_is_a_tls_failure():
    async def go():
        async with server(bad_request) as port:
            return await probe(f"https://127.0.0.1:{port}"), await probe(f"https+insecure://127.0.0.1:{port}")
    for result in run(go()):
        assert result.startswith("TLS: ") and one_line(result) and "trusted" not in result, result


def test_tls_server_that_hangs_up_mid_handshake():
    async def go():
        async with server(hang_up) as port:
            return await probe(f"https+insecure://127.0.0.1:{port}")
    assert run(go()) == "TLS: connection closed during handshake"


# -- tcp:// and unix: ---------------------------------------------------------------------------


def test_tcp_target_is_a_connect():
    async def go():
        connected = asyncio.Event()
        async with server(echo(connected)) as port:
            return await probe(f"tcp://127.0.0.1:{port}"), await reached(connected)
    assert run(go()) == ("ok", True)


def test_unix_socket_targets(short_dir):
    path = short_dir / "app.sock"
    stale = short_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on (a crashed app's)
    s.bind(str(stale))

    async def go():
        connected = asyncio.Event()
        async with server(echo(connected), unix=path):
            return (await probe(f"unix:{path}"), await reached(connected),
                    await probe(f"unix:{short_dir}/missing.sock"), await probe(f"unix:{stale}"))
    try:
        assert run(go()) == ("ok", True, "unreachable: no such socket", "refused")
    finally:
        s.close()


# -- bad targets -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "", "   ", "ftp://127.0.0.1:21", "http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:port",
    "tcp://127.0.0.1", "unix:relative.sock", "unix://host/x.sock", "http://", "http://a b:80",
    "http://127.0.0.1:80/\r\nX-Injected: 1", "\x00", "https+insecure://:443", None, 8080,
])
def test_a_bad_target_is_one_line_and_no_exception(target):
    result = run(probe(target))
    assert result.startswith("bad target: ") and one_line(result), result


@pytest.mark.parametrize("target,parsed,authority", [
    ("8080", Target("http", "127.0.0.1", 8080, "/"), "127.0.0.1:8080"),
    ("localhost:3000", Target("http", "localhost", 3000, "/"), "localhost:3000"),
    ("http://127.0.0.1:8096", Target("http", "127.0.0.1", 8096, "/"), "127.0.0.1:8096"),
    ("https://NAS.local:5001/admin?x=1", Target("https", "nas.local", 5001, "/admin?x=1"), "nas.local:5001"),
    ("https+insecure://127.0.0.1", Target("https+insecure", "127.0.0.1", 443, "/"), "127.0.0.1:443"),
    ("http://[::1]:8080", Target("http", "::1", 8080, "/"), "[::1]:8080"),
    ("tcp://127.0.0.1:22", Target("tcp", "127.0.0.1", 22, "/"), "127.0.0.1:22"),
    ("unix:/run/app.sock", Target("unix", path="/run/app.sock"), "/run/app.sock"),
])
def test_parse_takes_what_serve_takes(target, parsed, authority):
    assert parse(target) == parsed and parse(target).authority == authority


# -- classify: every exception is one line ---------------------------------------------------


def _cert_error():
    e = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                        "IP address mismatch, certificate is not valid for '127.0.0.1'.")
    e.reason = "CERTIFICATE_VERIFY_FAILED"
    return e


def _ssl_error(reason):
    e = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    e.reason = reason
    return e


@pytest.mark.parametrize("exc,result", [
    (TimeoutError(), "timeout"),
    (socket.timeout("timed out"), "timeout"),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), "timeout"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused"),
    (OSError(errno.ECONNREFUSED, "Connect call failed"), "refused"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "unreachable: network unreachable"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable: no route to host"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "unreachable: name not resolved"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "unreachable: no such socket"),
    (PermissionError(errno.EACCES, "Permission denied"), "unreachable: permission denied"),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "unreachable: address not available"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "unreachable: connection reset"),
    (OSError("AF_UNIX path too long"), "unreachable: af_unix path too long"),
    (OSError(errno.EMFILE, "Too many open files"), "unreachable: too many open files"),
    (_cert_error(), "TLS: certificate not trusted — use https+insecure://127.0.0.1:5001"),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "TLS: connection closed during handshake"),
    (_ssl_error("WRONG_VERSION_NUMBER"), "TLS: wrong version number"),
    (_ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), "TLS: tlsv1 alert protocol version"),
    (ssl.SSLError(), "TLS: sslerror"),
    (asyncio.IncompleteReadError(b"", 12), "not HTTP: closed without answering"),
    (upstream.NotHTTP("answered 'x'"), "not HTTP: answered 'x'"),
    (upstream.BadTarget("no host"), "bad target: no host"),
    (RuntimeError("boom\nsecond line"), "error: RuntimeError: boom second line"),
])
def test_classify_table(exc, result):
    assert classify(exc, "127.0.0.1:5001") == result


def test_classify_cuts_a_long_reason_in_the_middle_so_its_end_survives():
    result = classify(RuntimeError("x" * 500 + " bind: invalid argument"))
    assert one_line(result) and result.startswith("error: RuntimeError: xxx")
    assert result.endswith("bind: invalid argument") and "…" in result


# -- metrics ----------------------------------------------------------------------------------


def _snap(name, up):
    return ProxySnapshot(name=name, hostname=name, state="running", tailscale_ips=(), dns_name="",
                         target="https://127.0.0.1:5001", pid=None, restarts=0, recoveries=0,
                         last_error="", since=0.0, upstream=up)


def test_metrics_show_the_upstream_result():
    bad = 'TLS: certificate not trusted — use https+insecure://127.0.0.1:5001'
    text = metrics.render([_snap("nas", bad), _snap("jellyfin", "ok"), _snap("new", None),
                           _snap('we"ird', "refused")], {})
    lines = text.splitlines()
    assert 'ts_supervisor_proxy_upstream_up{proxy="nas"} 0' in lines
    assert 'ts_supervisor_proxy_upstream_up{proxy="jellyfin"} 1' in lines
    assert f'ts_supervisor_proxy_upstream_info{{proxy="nas",result="{bad}"}} 1' in lines
    assert 'ts_supervisor_proxy_upstream_info{proxy="jellyfin",result="ok"} 1' in lines
    assert 'ts_supervisor_proxy_upstream_up{proxy="we\\"ird"} 0' in lines
    assert not any('proxy="new"' in line and "upstream" in line for line in lines)  # not probed yet
    assert "# TYPE ts_supervisor_proxy_upstream_up gauge" in lines
    assert "# TYPE ts_supervisor_proxy_upstream_info gauge" in lines
