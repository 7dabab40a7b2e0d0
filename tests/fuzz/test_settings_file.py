"""Fuzz the settings file surface: `config.load_settings` on any bytes and on
any TOML value for any setting, [[webhook]] tables included.

Property: it returns Settings or raises SettingsError whose lines each start
with the file's path; nothing else is raised, and a webhook URL (a secret)
never appears in an error.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomli_w
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor import config as cfgmod

KEYS = sorted(cfgmod._SETTINGS_TYPES)
SECRET = "hooksecret7f3a"

SEEDS = [
    b'[[webhook]]\nurl = "https://ntfy.sh/t"\nevents = [["x"]]\n',
    b'[[webhook]]\nurl = "https://ntfy.sh/t"\nevents = [{a = 1}]\n',
    b'[[webhook]]\nurl = "https://ntfy.sh/t"\nformat = ["json"]\n',
    b'[[webhook]]\nurl = "http://[::1/' + SECRET.encode() + b'"\n',
    b'[[webhook]]\nurl = "https://h/' + SECRET.encode() + b' x"\n',
    b"x = " + b"[" * 500 + b"]" * 500 + b"\n",
    b"healthy_period = " + b"9" * 5000 + b"\n",
    b"healthy_period = 0x" + b"f" * 400 + b"\n",
    b"healthy_period = nan\nstart_window = inf\n",
    b"embedded_port = 70000\n",
    b'tailscale = "~nosuchuser9/bin/tailscale"\ntailscaled = ""\n',
    b'metrics = "127.0.0.1:\xd9\xa3"\n', b'metrics = "[::1%lo]:9101"\n',
    b'"a\\nb" = 1\n', b"\xff\xfe", b"t = 1\x00", b"# " + b"x" * (64 * 1024 + 1),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("settingsfuzz")


def check(path: Path) -> None:
    try:
        settings = cfgmod.load_settings(path)
    except cfgmod.SettingsError as e:
        lines = str(e).split("\n")
        assert lines
        for line in lines:
            assert line.startswith(f"{path}: ") and "\n" not in line, line
        assert SECRET not in str(e)
    else:
        assert isinstance(settings, cfgmod.Settings)


@given(st.binary(max_size=2048))
@example(SEEDS[0])
def test_any_bytes(workdir: Path, data: bytes) -> None:
    p = workdir / "bytes.toml"
    p.write_bytes(data)
    check(p)


@pytest.mark.parametrize("seed", SEEDS, ids=range(len(SEEDS)))
def test_seeds(workdir: Path, seed: bytes) -> None:
    p = workdir / "seed.toml"
    p.write_bytes(seed)
    check(p)


scalars = st.one_of(
    st.text(max_size=20), st.integers(), st.sampled_from([0, -1, 65536]),
    st.integers(60, 20000).map(lambda bits: 2**bits),  # beyond a float; beyond str()
    st.floats(), st.sampled_from([math.nan, math.inf]), st.booleans(), st.datetimes(), st.dates(),
    st.times(), st.sampled_from(["127.0.0.1:9101", "0.0.0.0:1", "~nosuchuser9/x", "", "json", "failed"]))
toml_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
urls = st.sampled_from([f"https://ntfy.sh/{SECRET}", f"http://[::1/{SECRET}", f"https://h:99999/{SECRET}",
                        f"https://h/{SECRET} x", f"ftp://h/{SECRET}"]) | toml_values
webhook = st.fixed_dictionaries({}, optional={
    "url": urls, "format": st.sampled_from(["json", "ntfy", "discord"]) | toml_values,
    "events": st.lists(st.sampled_from(["running", "failed", "recovering"]) | toml_values, max_size=4)
    | toml_values,
    "extra": toml_values})
settings_dicts = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), toml_values, max_size=6) \
    .flatmap(lambda d: st.one_of(st.just(d), st.lists(webhook, max_size=3).map(lambda w: {**d, "webhook": w}),
                                 toml_values.map(lambda w: {**d, "webhook": w})))


@given(settings_dicts)
@example({"webhook": [{"url": "https://ntfy.sh/t", "events": [["x"]]}]})
@example({"webhook": [{"url": f"http://[::1/{SECRET}"}]})
@example({"healthy_period": 10**400, "start_window": math.nan, "embedded_port": 70000})
@example({"tailscale": "~nosuchuser9/bin/tailscale"})
def test_any_toml_value_for_any_setting(workdir: Path, raw: dict) -> None:
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError, UnicodeError):
        return  # not representable in TOML: no file can hold it
    p = workdir / "structured.toml"
    try:
        p.write_text(text)
    except UnicodeError:
        return
    check(p)
