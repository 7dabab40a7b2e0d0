"""Go's runtime knobs for tailscaled (README "Go runtime knobs"): which values
the settings accept, and that what ts-supervisor.toml says is exactly what
reaches tailscaled's environment, through the builder the proxy runner uses."""
from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import tailscale as ts
from supervisor.config import SettingsError, load_settings

BINS = ts.Binaries(tailscale=Path("/x/tailscale"), tailscaled=Path("/x/tailscaled"))


@pytest.mark.parametrize(("name", "value", "ok"), [
    ("GOGC", "100", True), ("GOGC", "25", True), ("GOGC", "off", True), ("GOGC", "1", True),
    ("GOGC", "0", False),            # Go would collect continuously
    ("GOGC", "-1", False), ("GOGC", "50%", False), ("GOGC", "", False), ("GOGC", "١٠٠", False),
    ("GOGC", str(1 << 31), False),   # beyond Go's atoi32: read as 100, silently
    ("GOMEMLIMIT", "16MiB", True), ("GOMEMLIMIT", "8388608", True), ("GOMEMLIMIT", "512KiB", True),
    ("GOMEMLIMIT", "1GiB", True), ("GOMEMLIMIT", "100B", True), ("GOMEMLIMIT", "off", True),
    ("GOMEMLIMIT", "16MB", False),   # SI units: Go refuses to start ("malformed GOMEMLIMIT")
    ("GOMEMLIMIT", "16M", False), ("GOMEMLIMIT", "16 MiB", False), ("GOMEMLIMIT", "MiB", False),
    ("GOMEMLIMIT", "-1", False), ("GOMEMLIMIT", "8388608TiB", False),  # 2^63 bytes: overflows
    ("GOMAXPROCS", "1", False),      # not a knob the supervisor sets
])
def test_go_knob_values(name, value, ok):
    assert (ts.go_knob_problem(name, value) is None) == ok


@pytest.mark.parametrize(("toml", "knobs"), [
    ("", {}),                                                       # the default: Go's own
    ('tailscaled_gogc = ""\ntailscaled_gomemlimit = ""', {}),       # written out: the same
    ("tailscaled_gogc = 50", {"GOGC": "50"}),
    ('tailscaled_gogc = "off"\ntailscaled_gomemlimit = "16MiB"', {"GOGC": "off", "GOMEMLIMIT": "16MiB"}),
    ('tailscaled_gomemlimit = "12MiB"', {"GOMEMLIMIT": "12MiB"}),
    ("tailscaled_gomemlimit = 16777216", {"GOMEMLIMIT": "16777216"}),
])
def test_settings_reach_tailscaleds_environment(tmp_path, monkeypatch, toml, knobs):
    monkeypatch.setenv("GOGC", "7")          # the supervisor's own: never inherited (allow-list)
    monkeypatch.setenv("GOMEMLIMIT", "1MiB")
    path = tmp_path / "ts-supervisor.toml"
    path.write_text(toml)
    settings = load_settings(path)
    for control in ("http://127.0.0.1:1", None):
        argv, env = ts.tailscaled_command(BINS, tmp_path / "sd", quiet_control_url=control,
                                          go_env=settings.tailscaled_go_env())
        assert {k: env[k] for k in ts.GO_KNOBS if k in env} == knobs
        assert not any(a.startswith(("GOGC", "GOMEMLIMIT")) for a in argv)


@pytest.mark.parametrize("toml", [
    "tailscaled_gogc = 0", 'tailscaled_gogc = "fifty"', "tailscaled_gogc = true",
    'tailscaled_gomemlimit = "16MB"', "tailscaled_gomemlimit = 1.5", "tailscaled_gomemlimit = -5",
])
def test_a_bad_knob_is_one_settings_line_naming_the_key(tmp_path, toml):
    path = tmp_path / "ts-supervisor.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as e:
        load_settings(path)
    key = toml.split(" =")[0]
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith(f"{path}: {key}: ")


@pytest.mark.parametrize("go_env", [{"GOGC": "0"}, {"GOMEMLIMIT": "16MB"}, {"GODEBUG": "x=1"}])
def test_the_builder_refuses_what_go_would_misread(tmp_path, go_env):
    with pytest.raises(ValueError):
        ts.tailscaled_command(BINS, tmp_path, quiet_control_url=None, go_env=go_env)


@pytest.mark.parametrize(("text", "env"), [
    ("default", {}), ("GOGC=50", {"GOGC": "50"}),
    ("GOGC=off+GOMEMLIMIT=12MiB", {"GOGC": "off", "GOMEMLIMIT": "12MiB"}),
])
def test_bench_gomem_reads_a_setting(text, env):
    from scripts.bench_gomem import parse_setting
    assert parse_setting(text) == env


@pytest.mark.parametrize("text", ["GODEBUG=x=1", "GOGC=50+GOMAXPROCS=1"])
def test_bench_gomem_refuses_other_variables(text):
    from scripts.bench_gomem import parse_setting
    with pytest.raises(SystemExit):
        parse_setting(text)
