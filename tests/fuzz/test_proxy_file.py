"""Fuzz the proxy file surface: `config.load_proxy_file` on any bytes, and
`config.parse_proxy` on any TOML value for any key.

Property: the result is (config, []) or (None, [ConfigError, ...]); every
error is one line that starts with the file's path; nothing raises.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomli_w
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor import config as cfgmod

KEYS = sorted(cfgmod._PROXY_KEYS)

# Valid files to mutate: the README's examples, and the shapes the code branches on.
VALID = [
    b'hostname = "jellyfin"\ntarget = "http://127.0.0.1:8096"\nserve = "http"\nport = 80\n'
    b'login_server = "embedded"\nephemeral = false\ntags = ["tag:media"]\n',
    b'target = "tcp://127.0.0.1:22"\nlogin_server = "embedded"\n',
    b'hostname = "jellyfin"\ntarget = "http://127.0.0.1:8096"\nserve = "http"\nport = 80\n'
    b'auth_key_file = "/etc/ts-supervisor/tailnet.key"\n',
    b'target = "https://127.0.0.1:8443"\nserve = "https"\nauth_key_file = "ts.key"\n'
    b'login_server = "https://hs.example:443"\n',
    b'target = "http://[::1]:8080"\nauth_key_env = "TS_KEY"\nlogin_server = "http://127.0.0.1:9000"\n',
]

NEST_BOMB = b"x = " + b"[" * 500 + b"]" * 500 + b"\n"
TABLE_BOMB = b"x = " + b"{a = " * 400 + b"1" + b"}" * 400 + b"\n"
SEEDS = [
    NEST_BOMB, TABLE_BOMB, b"[" * 1000,
    b'target = "http://[::1:8080"\nlogin_server = "embedded"\n',
    b'target = "http://127.0.0.1:1"\nlogin_server = "http://[zz]:80"\n',
    b'target = "http://127.0.0.1:99999"\nlogin_server = "embedded"\n',
    b'target = "http://\xef\xbc\x83x:1"\nlogin_server = "embedded"\n',  # NFKC netloc check
    b'target = "http://127.0.0.1:1"\nauth_key_file = "~nosuchuser9/k"\n',
    b'target = "http://127.0.0.1:1"\nauth_key_file = "a\\u0000b"\n',
    b'target = "http://127.0.0.1:1"\nauth_key_file = "/dev/zero"\n',
    b'target = "http://127.0.0.1:1"\nauth_key_file = "/bin/sh"\n',
    b'target = "http://127.0.0.1:1"\nlogin_server = "embedded"\nport = ' + b"9" * 5000 + b"\n",
    b'target = "http://127.0.0.1:1"\nlogin_server = "embedded"\nport = 0x' + b"f" * 5000 + b"\n",
    b'target = "http://127.0.0.1:1"\nlogin_server = "embedded"\nport = nan\n',
    b'target = "http://127.0.0.1:1"\nlogin_server = "embedded"\nport = inf\n',
    b'target = "http://127.0.0.1:1"\nlogin_server = "embedded"\n"a\\nb" = 1\n',
    b"target = \"http://127.0.0.1:1\"\x00\n", b"\xff\xfe\x00t", b"",
    b"# " + b"x" * (64 * 1024 + 1),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("proxyfuzz")
    (d / "ts.key").write_text("tskey-auth-fuzz\n")
    return d


def check(path: Path, result: tuple) -> None:
    cfg, errors = result
    if cfg is not None:
        assert errors == [] and isinstance(cfg, cfgmod.ProxyConfig)
        cfg.fingerprint()  # what the fleet does with every loaded config
        cfg.local_control
        return
    assert errors, "no config and no error"
    for e in errors:
        assert isinstance(e, cfgmod.ConfigError)
        line = str(e)
        assert "\n" not in line and line.startswith(f"{path}: "), line


def test_every_valid_seed_loads(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation corpus is valid to begin with (else mutating it tests little)."""
    monkeypatch.setenv("TS_KEY", "tskey-auth-fuzz")
    (workdir / "etc.key").write_text("k")
    for i, body in enumerate(VALID):
        p = workdir / f"valid{i}.toml"
        p.write_bytes(body.replace(b"/etc/ts-supervisor/tailnet.key", str(workdir / "etc.key").encode()))
        cfg, errors = cfgmod.load_proxy_file(p)
        assert errors == [] and cfg is not None, errors


@given(st.binary(max_size=2048))
@example(NEST_BOMB)
def test_any_bytes(workdir: Path, data: bytes) -> None:
    p = workdir / "bytes.toml"
    p.write_bytes(data)
    check(p, cfgmod.load_proxy_file(p))


@pytest.mark.parametrize("seed", SEEDS, ids=range(len(SEEDS)))
def test_seeds(workdir: Path, seed: bytes) -> None:
    p = workdir / "seed.toml"
    p.write_bytes(seed)
    check(p, cfgmod.load_proxy_file(p))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file with a few bytes flipped, inserted or deleted."""
    b = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat"]))
        i = draw(st.integers(0, len(b)))
        if op == "flip" and i < len(b):
            b[i] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
                [b"~", b"[", b"{", b"\\u0000", b'"', b"\n", b"9" * 40, b":", b"%"]))
        elif op == "delete" and i < len(b):
            del b[i:i + draw(st.integers(1, 4))]
        elif op == "repeat":
            b[i:i] = draw(st.sampled_from([b"[", b"{a="])) * draw(st.integers(1, 600))
    return bytes(b)


@given(mutated())
@example(VALID[2].replace(b'"/etc', b'"~etc'))
@example(VALID[0].replace(b"127.0.0.1:8096", b"[::1:8096"))
def test_mutations_of_a_valid_file(workdir: Path, data: bytes) -> None:
    p = workdir / "mutant.toml"
    p.write_bytes(data)
    check(p, cfgmod.load_proxy_file(p))


URLISH = st.sampled_from([
    "http://[::1:8080", "http://[zz]:80", "http://[::1", "tcp://h:99999", "http://h:-1", "tcp://h:x",
    "http://\uff03x:1", "http://127.0.0.1:0", "tcp://127.0.0.1", "http://a b:1", "http://h:1\n",
    "embedded", "", "~nosuchuser9/k", "/dev/zero", "/bin/sh", "a\x00b", "ts.key", "\ud800",
]) | st.integers(100, 5000).map(lambda n: "http://" + "x" * n)
scalars = st.one_of(
    st.text(max_size=30), URLISH, st.integers(), st.sampled_from([0, 1, 80, 65535, 65536, -1]),
    st.integers(60, 70000).map(lambda bits: 2**bits - 1),  # past str()'s 4300 digits too
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 80.0]), st.booleans(),
    st.datetimes(), st.dates(), st.times())
toml_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), toml_values, max_size=8))
@example({"target": "http://[::1:8080", "login_server": "embedded"})
@example({"target": "http://127.0.0.1:1", "login_server": "http://[zz]:80"})
@example({"target": "http://127.0.0.1:1", "auth_key_file": "~nosuchuser9/k"})
@example({"target": "http://127.0.0.1:1", "auth_key_file": "/bin/sh"})
@example({"target": "http://127.0.0.1:1", "auth_key_env": "\ud800"})
@example({"auth_key_file": "\ud800"})  # `add --auth-key-file` with a non-UTF-8 argument
@example({"target": "http://127.0.0.1:1", "login_server": "embedded", "port": 10**5000})
@example({"target": "http://127.0.0.1:1", "login_server": "embedded", "port": math.nan})
@example({"target": "http://127.0.0.1:1", "login_server": "embedded", "a\nb": [[[]]]})
def test_any_toml_value_for_any_key(workdir: Path, raw: dict) -> None:
    p = workdir / "structured.toml"
    check(p, cfgmod.parse_proxy(p, raw))


@given(st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=8))
def test_any_toml_value_through_the_file(workdir: Path, raw: dict) -> None:
    """The same values, written as TOML text and read back through the file path."""
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError, UnicodeError):
        return  # not representable in TOML (e.g. a lone surrogate): no file can hold it
    p = workdir / "roundtrip.toml"
    try:
        p.write_text(text)
    except UnicodeError:
        return
    check(p, cfgmod.load_proxy_file(p))
