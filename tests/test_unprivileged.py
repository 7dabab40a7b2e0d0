"""ts-supervisor without root: the systemd unit as systemd itself judges it, a
real proxy run, recovered and stopped by an unprivileged uid, and nas-boot.sh's
drop of privileges (setpriv, and su where setpriv is missing).

Becoming another uid takes root, so these tests run as root (inside
scripts/netns) and start the supervisor through `setpriv`. That uid (65534,
nobody) must reach the repo, its venv, the interpreter, the tailscale binaries
and the test's own files, but a CI clone, pyenv's /root or pytest's
/tmp/pytest-of-root may sit under a 0700 directory. Copying is no way out: the
interpreter finds libpython by an absolute rpath. So the supervisor runs in a
mount namespace of its own in which each directory that uid cannot search is
covered by a 0755 tmpfs holding bind mounts of only the entries on the way to
what it needs (`reachable_by_nobody`). Paths stay the same, nothing changes
outside that namespace, and the same venv and binaries run as in every other
test.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tomli_w

from supervisor import ipc
from supervisor.control.cli import AdminClient
from tests.conftest import BODY
from tests.harness import curl_via, peer, wait_for
from tests.supervisor_harness import ROOT, SupervisorProc

NOBODY = 65534  # uid and gid: nobody / nogroup on Debian
SERVICE = ROOT / "scripts" / "service"
UNIT = SERVICE / "ts-supervisor.service"
SYSUSERS = SERVICE / "ts-supervisor.sysusers"
NAS_BOOT = SERVICE / "nas-boot.sh"
VENV_BIN = Path(sys.executable).parent  # the venv's bin (not resolved: the venv python)


def tool(name: str) -> str:
    """A system tool the tests need; scripts/setup installs the missing ones in CI."""
    path = shutil.which(name)
    assert path, f"{name} is not installed: run scripts/setup (it installs it as root with apt-get)"
    return path


# -- the systemd unit -------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's settings: section -> key -> every value in order (a key may
    repeat); backslash continuations joined, comments dropped (systemd.syntax(7))."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    logical = re.sub(r"\s*\\\n\s*", " ", text)
    for line in logical.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("text,want", [
    ("[A]\nK=1\nK=2\n# c\n", {"A": {"K": ["1", "2"]}}),
    ("[A]\nExecStart=/x a \\\n    b\n", {"A": {"ExecStart": ["/x a b"]}}),
    ("[A]\nCapabilityBoundingSet=\n[B]\n; c\nX = y z\n", {"A": {"CapabilityBoundingSet": [""]},
                                                          "B": {"X": ["y z"]}}),
])
def test_unit_settings_reads_sections_repeats_and_continuations(text, want):
    assert unit_settings(text) == want


def filled_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with its install path filled in (this checkout's venv), as its
    install comment tells an operator to do."""
    text = (UNIT.read_text() if text is None else text).replace("/opt/ts-supervisor", str(ROOT))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit,complaint", [
    (None, None),
    (("ProtectSystem=strict", "ProtectSytem=strict"), "Unknown key"),
    (("/.venv/bin/ts-supervisor", "/.venv/bin/ts-supervisr"), "ts-supervisr"),
], ids=["as-shipped", "misspelt-key", "missing-binary"])
def test_systemd_analyze_verify_accepts_the_unit_and_no_less(tmp_path, edit, complaint):
    """As shipped: no complaint at all (verify exits 0 even on unknown keys, so
    any output counts). The two edits show the check bites."""
    text = UNIT.read_text()
    if edit:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1])
    out = subprocess.run([tool("systemd-analyze"), "verify", str(filled_unit(tmp_path, text))],
                         capture_output=True, text=True, timeout=60)
    said = (out.stdout + out.stderr).strip()
    if complaint is None:
        assert out.returncode == 0 and said == "", said
    else:
        assert complaint in said, said


# The list, then what else tsnsrv's NixOS module sets that fits
# (boinkor-net/tsnsrv nixos/default.nix, lockedDownserviceConfig).
HARDENING = {
    "User": "ts-supervisor", "Group": "ts-supervisor",
    "StateDirectory": "ts-supervisor", "StateDirectoryMode": "0700",
    "ProtectSystem": "strict", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "UMask": "0077",
    "AmbientCapabilities": "", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
    "PrivateDevices": "yes", "PrivateMounts": "yes", "PrivateTmp": "yes", "PrivateUsers": "yes",
    "ProtectClock": "yes", "ProtectControlGroups": "yes", "ProtectHome": "yes",
    "ProtectProc": "noaccess", "ProtectKernelModules": "yes", "ProtectHostname": "yes",
    "ProtectKernelLogs": "yes", "ProtectKernelTunables": "yes", "RestrictNamespaces": "yes",
    "RemoveIPC": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
}


def test_the_unit_runs_as_its_own_user_with_tsnsrvs_hardening():
    svc = unit_settings(UNIT.read_text())["Service"]
    got = {key: svc.get(key, ["<unset>"])[-1] for key in HARDENING}
    assert got == HARDENING
    assert "DynamicUser" not in svc  # why: the unit's comment
    assert int(svc["LimitNOFILE"][-1]) >= 65536
    argv = shlex.split(svc["ExecStart"][-1])
    assert argv[argv.index("--settings") + 1] == "/etc/ts-supervisor/ts-supervisor.toml"
    assert argv[argv.index("--data-dir") + 1] == "/var/lib/" + svc["StateDirectory"][-1]


def test_systemd_rates_the_units_exposure_ok(tmp_path):
    """`systemd-analyze security` scores 0 (locked down) to 10 (UNSAFE); the
    unit as it was, root with no sandbox, scored 9.6."""
    out = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", "--threshold=30",
                          str(filled_unit(tmp_path))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2500:] + out.stderr


def test_the_sysusers_entry_makes_the_units_user_with_the_state_dir_as_home(tmp_path):
    (tmp_path / "etc").mkdir()
    out = subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
                         input=SYSUSERS.read_text(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    svc = unit_settings(UNIT.read_text())["Service"]
    users = {f[0]: f for f in (x.split(":") for x in (tmp_path / "etc/passwd").read_text().splitlines())}
    groups = {x.split(":")[0] for x in (tmp_path / "etc/group").read_text().splitlines()}
    name, _, uid, _, _, home, shell = users[svc["User"][-1]]
    assert int(uid) != 0 and svc["Group"][-1] in groups
    assert home == "/var/lib/" + svc["StateDirectory"][-1] and shell.endswith("nologin")


# -- a tree nobody can reach ----------------------------------------------------------


def _searchable(st: os.stat_result, uid: int, gid: int) -> bool:
    """May uid:gid (no supplementary groups) search this directory? The kernel
    takes the owner's bits for the owner, else the group's, else the others'."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def searched(path: Path) -> Iterator[tuple[Path, str]]:
    """(directory, entry) for every directory that resolving `path` searches:
    a symlink is read in one directory and followed from its target on."""
    cur = Path("/")
    for part in Path(os.path.abspath(path)).parts[1:]:
        yield cur, part
        nxt = cur / part
        if nxt.is_symlink():
            target = nxt.resolve()
            for i in range(1, len(target.parts)):
                yield Path(*target.parts[:i]), target.parts[i]
            nxt = target
        cur = nxt


def blocked_dirs(needed: list[Path], uid: int = NOBODY, gid: int = NOBODY) -> dict[Path, set[str]]:
    """Directories on the way to `needed` that uid:gid cannot search, each with
    the entries in it that lead on."""
    out: dict[Path, set[str]] = {}
    for path in needed:
        for here, entry in searched(path):
            if not _searchable(os.stat(here), uid, gid):
                out.setdefault(here, set()).add(entry)
    return out


def reachable_by_nobody(needed: list[Path], stage: Path) -> list[str]:
    """An argv prefix that runs the rest as root in a private mount namespace
    where uid:gid 65534 can search its way to every path in `needed`, with umask
    0077 (the unit's UMask=). Each blocked directory is covered by a 0755 tmpfs
    holding bind mounts of only the entries that lead on; `stage` (root's, and
    outside every blocked directory) holds them meanwhile."""
    blocked = blocked_dirs(needed)
    assert not [d for d in blocked if stage.is_relative_to(d)], f"{stage} lies under a blocked dir"
    q = shlex.quote
    mount, mkdir, touch, ln = (tool(t) for t in ("mount", "mkdir", "touch", "ln"))  # the PATH may be bare
    lines = ["set -e", f"{mount} -t tmpfs -o mode=0700 tmpfs {q(str(stage))}"]
    n = 0
    for d in sorted(blocked, key=lambda p: len(p.parts)):  # outer first: inner paths go through it
        back = []
        for name in sorted(blocked[d]):
            src, held = d / name, stage / str(n)
            if src.is_symlink():  # the same link again; where it leads is masked on its own
                back.append(f"{ln} -s {q(os.readlink(src))} {q(str(src))}")
                continue
            n += 1
            make = mkdir if src.is_dir() else touch
            lines += [f"{make} {q(str(held))}", f"{mount} --bind {q(str(src))} {q(str(held))}"]
            back += [f"{make} {q(str(src))}", f"{mount} --bind {q(str(held))} {q(str(src))}"]
        lines += [f"{mount} -t tmpfs -o mode=0755 tmpfs {q(str(d))}", *back]
    lines += ["umask 077", 'exec "$@"']
    return [tool("unshare"), "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", "\n".join(lines), "sh"]


def test_blocked_dirs_names_each_dir_nobody_cannot_search_and_the_way_on(tmp_path):
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "open").mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(top, 0o700)
    os.chmod(top / "a", 0o711)
    os.chmod(top / "a" / "b", 0o700)
    (top / "link").symlink_to(top / "a" / "b")
    got = blocked_dirs([top / "a" / "b" / "x", top / "open", top / "link" / "y"])
    assert {d: n for d, n in got.items() if d.is_relative_to(top)} == {
        top: {"a", "open", "link"}, top / "a" / "b": {"x", "y"}}


def the_interpreter() -> list[Path]:
    """What running this venv's python needs: the venv and its interpreter
    (wherever the venv's symlinks lead) with its stdlib and libpython."""
    return [VENV_BIN / "python", Path(sys.executable).resolve(), Path(sys.base_prefix).resolve(),
            Path(sys.prefix)]


DROP = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
        "--bounding-set=-all", "--inh-caps=-all", "--"]
# MemoryDenyWriteExecute= as the kernel does it for one process tree (PR_SET_MDWE,
# PR_MDWE_REFUSE_EXEC_GAIN; Linux 6.3+, kept across fork and execve). An older
# kernel refuses the prctl and the run goes on without it.
MDWE = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0); "
        "os.execv(sys.argv[1], sys.argv[1:])")


@pytest.fixture
def stage() -> Iterator[Path]:
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="ts-sup-stage-"))
    yield d
    d.rmdir()  # empty out here: its tmpfs lived in the namespace only


# -- a real proxy as nobody -------------------------------------------------------------


@dataclass
class UnprivilegedSupervisor(SupervisorProc):
    """`ts-supervisor run` as the unit runs it, but for systemd: uid and gid
    65534 with no groups, no capabilities (none to gain: no_new_privs), umask
    0077, write-xor-execute memory, a data dir made for it 0700
    (StateDirectory=), root's conf.d and settings. Like the other tests it runs
    this checkout's package (`-m supervisor` from the repo), not the venv's
    entry point."""
    prefix: list[str] = field(default_factory=list)

    def start(self, wait: bool = True) -> "UnprivilegedSupervisor":
        settings = self.data_dir.parent / "settings.toml"
        settings.write_text(tomli_w.dumps({"backoff_initial": 0.2, **self.settings}))
        settings.chmod(0o644)
        for f in [self.config_dir, *self.config_dir.iterdir()]:
            f.chmod(0o755 if f.is_dir() else 0o644)
        self.output = self.data_dir.parent / "output.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TS_SUPERVISOR_DATA") and k != "XDG_RUNTIME_DIR"}
        env.update(HOME="/nonexistent", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-c", MDWE, tool("setpriv"), *DROP,
                 sys.executable, "-m", "supervisor", "run", "--no-console",
                 "--config-dir", str(self.config_dir), "--data-dir", str(self.data_dir),
                 "--settings", str(settings)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        if wait:
            wait_for(lambda: self._answers() or self._died(), 30, "supervisor control socket")
        return self


@pytest.fixture
def unprivileged(tmp_path: Path, stage: Path, any_bins) -> Iterator[UnprivilegedSupervisor]:
    tmp_path.chmod(0o755)  # as /etc/ts-supervisor and /var/lib are
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY, NOBODY)
    (tmp_path / "conf.d").mkdir()
    needed = [*the_interpreter(), ROOT, any_bins.tailscale, any_bins.tailscaled, tmp_path]
    prefix = reachable_by_nobody(needed, stage)
    # The tree is traversable: nobody imports the supervisor and can run both binaries.
    probe = subprocess.run(
        [*prefix, tool("setpriv"), *DROP, str(VENV_BIN / "python"), "-c",
         "import os, sys, supervisor.cli, supervisor.fleet, supervisor.control.server; "
         "bad = [p for p in sys.argv[1:] if not os.access(p, os.X_OK)]; sys.exit(' '.join(bad) or None)",
         str(any_bins.tailscale), str(any_bins.tailscaled), str(data)],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert probe.returncode == 0, f"uid {NOBODY} cannot reach the test's tree: {probe.stderr}"
    s = UnprivilegedSupervisor(tmp_path / "conf.d", data, prefix=prefix)
    s.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    yield s
    s.stop()


def _ids(p: psutil.Process) -> tuple:
    return tuple(p.uids()), tuple(p.gids())


@pytest.mark.real
def test_a_real_proxy_runs_recovers_and_stops_as_an_unprivileged_uid(unprivileged, local_http,
                                                                     bins, tmp_path):
    sup = unprivileged
    sup.write_proxy("web", hostname="web", target=f"http://127.0.0.1:{local_http}", serve="http",
                    port=80, login_server="embedded")
    sup.start()
    sup.wait_state("web", "running", 60)

    # Who runs what: the supervisor, the embedded control and tailscaled, all as nobody.
    procs = [psutil.Process(sup.proc.pid), *sup.children()]
    assert "tailscaled" in {p.name() for p in procs}
    assert {_ids(p) for p in procs} == {((NOBODY,) * 3, (NOBODY,) * 3)}
    with open(f"/proc/{sup.proc.pid}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    assert fields["CapEff"].strip("0\n") == "" and fields["NoNewPrivs"].strip() == "1"
    # What it made is its own, and nobody else's to read.
    made = [sup.data_dir, *sup.data_dir.rglob("*")]
    assert {p.lstat().st_uid for p in made} == {NOBODY}
    assert stat.S_IMODE(sup.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((sup.data_dir / "events.jsonl").stat().st_mode) == 0o600

    # A recovery: the node is deleted on the control; a new one serves the same name.
    admin = AdminClient.from_data_dir(sup.data_dir / "control")
    old = [n for n in admin.nodes() if n["hostname"] == "web"]
    n = len(sup.events())
    admin.act("nodes", old[0]["id"], "delete")
    sup.wait_state("web", "recovering", 20, after=n)
    sup.wait_state("web", "running", 60, after=n)
    assert sup.status()["web"]["recoveries"] == 1
    assert [x["id"] for x in admin.nodes() if x["hostname"] == "web"] != [old[0]["id"]]
    with peer(bins, tmp_path / "peer", admin.url, admin.create_key()["secret"]) as socks:
        wait_for(lambda: curl_via(socks, "http://web.tailnet.test/") == BODY.decode(), 30,
                 "a peer to fetch the app through the recovered proxy")

    # A clean stop: exit 0, every tailscaled gone with it.
    children = sup.children()
    assert sup.stop() == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


# -- nas-boot.sh -----------------------------------------------------------------------

# What nas-boot.sh runs by name; a PATH of only these hides setpriv when asked.
NAS_TOOLS = ["dirname", "basename", "id", "mkdir", "stat", "chown", "chmod", "su", "nohup"]


def nas_install(tmp_path: Path, with_setpriv: bool) -> tuple[Path, Path, Path]:
    """A NAS install dir as the boot task finds it on a Synology share: nas-boot.sh
    (a copy, so that its HERE is this dir), the project's venv (a symlink), an empty
    conf.d and a data dir from the days the script ran everything as root (a 0644
    root log), all 0777/0666 as DSM shows an ACL share. The settings file is root's
    outside the share (/etc/ts-supervisor/ on a NAS) and vouches for the share with
    trust_acl_paths. Returns (install dir, settings file, PATH dir)."""
    here = tmp_path / "ts-supervisor"
    (here / "scripts" / "service").mkdir(parents=True)
    shutil.copy(NAS_BOOT, here / "scripts" / "service" / "nas-boot.sh")
    (here / ".venv").symlink_to(Path(sys.prefix))
    (here / "conf.d").mkdir()
    data = here / "data"
    data.mkdir()
    (data / "supervisor.log").write_text("a line from a root run\n")
    etc = tmp_path / "etc" / "ts-supervisor"
    etc.mkdir(parents=True)
    settings = etc / "ts-supervisor.toml"
    settings.write_text(tomli_w.dumps({"backoff_initial": 0.5, "trust_acl_paths": [str(here)]}))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in NAS_TOOLS + (["setpriv"] if with_setpriv else []):
        (bindir / name).symlink_to(tool(name))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if not p.is_symlink():
            share = p == here or here in p.parents
            p.chmod((0o777 if share else 0o755) if p.is_dir() else (0o666 if share else 0o644))
    return here, settings, bindir


@pytest.mark.real
@pytest.mark.parametrize("with_setpriv", [True, False], ids=["setpriv", "su-fallback"])
def test_nas_boot_starts_the_supervisor_as_the_service_user(tmp_path, stage, with_setpriv):
    """On an ACL share (0777 everywhere) with root's settings file outside it."""
    here, settings, bindir = nas_install(tmp_path, with_setpriv)
    data = here / "data"
    prefix = reachable_by_nobody([*the_interpreter(), ROOT, tmp_path], stage)
    out = subprocess.run([*prefix, "/bin/sh", str(here / "scripts" / "service" / "nas-boot.sh")],
                         env={"PATH": str(bindir), "TS_SUPERVISOR_USER": "nobody", "HOME": "/root",
                              "TS_SUPERVISOR_SETTINGS": str(settings)},
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"started as nobody \(pid (\d+)\)", out.stdout)
    assert m, out.stdout + out.stderr
    proc = psutil.Process(int(m.group(1)))
    try:
        wait_for(lambda: ipc.call(data, "status", timeout=2), 30,
                 f"the supervisor to answer\n{(data / 'supervisor.log').read_text()}")
        assert _ids(proc) == ((NOBODY,) * 3, (NOBODY,) * 3)
        assert proc.cmdline()[-2:] == ["--settings", str(settings)]
        # The share's conf.d is accepted only by the waiver, and says so.
        events = [json.loads(line) for line in (data / "events.jsonl").read_text().splitlines()]
        assert any(e["event"] == "trust_waived" and str(here / "conf.d") in e["reason"] for e in events), events
        with open(f"/proc/{proc.pid}/status") as f:
            caps = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        assert caps["CapEff"].strip("0\n") == ""
        assert caps["NoNewPrivs"].strip() == ("1" if with_setpriv else "0")  # which way it dropped
        # The root-era data dir is handed over and closed; new files are 0600.
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert {p.lstat().st_uid for p in [data, *data.rglob("*")]} == {NOBODY}
        assert stat.S_IMODE((data / "events.jsonl").stat().st_mode) == 0o600
        # A second boot finds it running and starts nothing.
        again = subprocess.run([*prefix, "/bin/sh", str(here / "scripts" / "service" / "nas-boot.sh")],
                               env={"PATH": str(bindir), "TS_SUPERVISOR_USER": "nobody",
                                    "TS_SUPERVISOR_SETTINGS": str(settings)},
                               capture_output=True, text=True, timeout=60, cwd="/")
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    finally:
        # Ours: started by the script, re-parented to pytest (a child subreaper), not reaped.
        assert proc.ppid() == os.getpid()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.real
@pytest.mark.parametrize("user,says", [("no-such-user-ts", "no user no-such-user-ts"),
                                       ("root", "is root")])
def test_nas_boot_refuses_a_missing_or_root_service_user(tmp_path, user, says):
    data = tmp_path / "data"
    out = subprocess.run(["/bin/sh", str(NAS_BOOT)], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "TS_SUPERVISOR_USER": user,
                              "TS_SUPERVISOR_DATA_DIR": str(data)})
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and says in out.stderr, out.stderr
    assert not data.exists()


@pytest.mark.real
def test_nas_boot_stops_at_a_settings_file_in_the_install_dir_saying_where_it_goes(tmp_path, stage):
    """Older installs kept ts-supervisor.toml next to the script: on a share anyone may
    write it, and the supervisor would refuse it (after the script said "started");
    starting without it would drop its settings silently."""
    if os.path.lexists("/etc/ts-supervisor/ts-supervisor.toml"):
        pytest.skip("this machine has /etc/ts-supervisor/ts-supervisor.toml: the script would use it")
    here, _, bindir = nas_install(tmp_path, with_setpriv=True)
    (here / "ts-supervisor.toml").write_text("backoff_initial = 0.5\n")
    prefix = reachable_by_nobody([*the_interpreter(), ROOT, tmp_path], stage)
    out = subprocess.run([*prefix, "/bin/sh", str(here / "scripts" / "service" / "nas-boot.sh")],
                         env={"PATH": str(bindir), "TS_SUPERVISOR_USER": "nobody"},
                         capture_output=True, text=True, timeout=30, cwd="/")
    if m := re.search(r"\(pid (\d+)\)", out.stdout):  # it started one: ours, not reaped
        with contextlib.suppress(psutil.NoSuchProcess):
            started = psutil.Process(int(m.group(1)))
            if started.ppid() == os.getpid():
                started.send_signal(signal.SIGTERM)
                started.wait(30)
    assert (out.returncode, out.stdout) == (1, ""), out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"nas-boot: error: {here}/ts-supervisor.toml is not read (on a share others may write it): "
        f"move it to /etc/ts-supervisor/ts-supervisor.toml (root's, 0644) with "
        f'trust_acl_paths = ["{here}"], or name it in TS_SUPERVISOR_SETTINGS'], out.stderr
    assert (here / "data" / "supervisor.log").read_text() == "a line from a root run\n"


# -- scripts/setup installs what these tests need -----------------------------------------


@pytest.mark.parametrize("ci,rc,says", [("true", 1, "setup: error: missing systemd-analyze: install systemd"),
                                        ("", 0, "setup: warning: missing systemd-analyze: install systemd")])
def test_setup_names_a_missing_system_tool_and_fails_ci(tmp_path, ci, rc, says):
    """No systemd-analyze and no apt-get to install it (a clean machine, not
    root's): CI stops at setup instead of skipping the tests that need it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for entry in Path(d).glob("*") if Path(d).is_dir() else []:
            if entry.name not in {"systemd-analyze", "apt-get"} and not (bindir / entry.name).exists():
                (bindir / entry.name).symlink_to(entry)
    out = subprocess.run([tool("bash"), str(ROOT / "scripts" / "system-deps")], capture_output=True,
                         text=True, timeout=60, env={"PATH": str(bindir), "CI": ci})
    assert (out.returncode, out.stdout) == (rc, "") and out.stderr.startswith(says), out.stderr


def test_the_units_documentation_is_this_projects_readme(tmp_path):
    """`Documentation=` named tsnsrv's repository (whose hardening the unit
    borrows), so `systemctl help ts-supervisor` led elsewhere. It is this
    install's README, a file: URI that the install path fills in as ExecStart's."""
    (doc,) = unit_settings(UNIT.read_text())["Unit"]["Documentation"]
    assert doc == "file:/opt/ts-supervisor/README.md"
    (filled,) = unit_settings(filled_unit(tmp_path).read_text())["Unit"]["Documentation"]
    assert Path(filled.removeprefix("file:")) == ROOT / "README.md" and (ROOT / "README.md").is_file()
