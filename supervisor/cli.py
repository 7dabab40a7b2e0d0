"""ts-supervisor's command line: run, status, check; operate.py adds the operator
commands, control/cli.py the control plane's."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor import config as cfgmod
from supervisor import trust

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
# The settings file when --settings is not given (if it exists): a fixed system
# path, never the working directory (whoever can write the working directory
# would name the binaries root executes).
SYSTEM_SETTINGS = Path("/etc/ts-supervisor/ts-supervisor.toml")


def default_data_dir() -> Path:
    """$TS_SUPERVISOR_DATA_DIR, else /var/lib/ts-supervisor for root (a NAS
    service), else $XDG_STATE_HOME/ts-supervisor (~/.local/state/ts-supervisor)."""
    if env := os.environ.get("TS_SUPERVISOR_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/ts-supervisor")
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "ts-supervisor"


def settings_path(args: argparse.Namespace) -> Path | None:
    """--settings, else SYSTEM_SETTINGS if it exists, else None (the defaults)."""
    if args.settings is not None:
        return args.settings
    return SYSTEM_SETTINGS if os.path.lexists(SYSTEM_SETTINGS) else None


_cwd_hint_given = False


def cwd_settings_hint(args: argparse.Namespace, cwd: Path | None = None) -> str | None:
    """One warning line when --settings is not given and the working directory
    holds a ts-supervisor.toml, which is never read (whoever may write the
    working directory would name the binaries root executes); None otherwise."""
    here = (cwd or Path.cwd()) / SYSTEM_SETTINGS.name
    if args.settings is not None or not os.path.lexists(here):
        return None
    try:
        if os.path.lexists(SYSTEM_SETTINGS) and os.path.samefile(here, SYSTEM_SETTINGS):
            return None  # run from /etc/ts-supervisor: that file is the one read
    except OSError:
        pass
    used = SYSTEM_SETTINGS if os.path.lexists(SYSTEM_SETTINGS) else "built-in defaults"
    return (f"{here} is ignored (settings are never read from the working directory; using "
            f"{used}): pass --settings {here}, or move it to {SYSTEM_SETTINGS}")


def _settings(args: argparse.Namespace) -> cfgmod.Settings:
    """The settings (settings_path), trusted as root trusts: the file itself only
    if no one but root and this user can write it (its own trust_acl_paths cannot
    vouch for it), the files it names by its ACL-aware policy. Raises SettingsError.
    Warns once per process about an ignored ./ts-supervisor.toml (cwd_settings_hint)."""
    global _cwd_hint_given
    if not _cwd_hint_given and (hint := cwd_settings_hint(args)):
        _cwd_hint_given = True
        _warn(hint)
    path = settings_path(args)
    settings = cfgmod.load_settings(path)
    if path is None:
        return settings
    problems = [f"{path}: {why}" for why in [trust.Policy().problem(path)] if why]
    problems += [f"{path}: {key}: {why}" for key, why in _trust(settings).key_problems(settings)]
    if problems:
        raise cfgmod.SettingsError(problems)
    return settings


def _trust(settings: cfgmod.Settings, path: Path | None = None) -> trust.Policy:
    """The policy for what the settings name; with the settings' `path`, a
    warning (Policy.exposed) if it names webhooks and others may read it."""
    policy = trust.Policy(acl_paths=settings.trust_acl_paths)
    if path is not None and settings.webhooks:
        policy.note_exposed(path, f"{path}: webhook", "webhook URLs")
    return policy


def register_secrets(args: argparse.Namespace) -> None:
    """Read every configured secret once, at start, so that this process
    redacts them too: the settings' (webhook URLs, credential files) and those
    of each proxy file in the config dir the last `run` recorded in
    DATA/run.json (its settings file too, unless --settings is given).
    Best effort: what cannot be read or trusted is skipped."""
    from supervisor.events import register_configured
    from supervisor.fleet import RUN_RECORD
    record: dict = {}
    try:
        loaded = json.loads(cfgmod.read_text(args.data_dir / RUN_RECORD))
        record = loaded if isinstance(loaded, dict) else {}
    except (cfgmod.Unreadable, ValueError):
        pass
    if args.settings is None and isinstance(record.get("settings"), str):
        args = argparse.Namespace(**{**vars(args), "settings": Path(record["settings"])})
    try:
        settings = _settings(args)
    except cfgmod.SettingsError:
        settings = cfgmod.Settings()
    register_configured(settings)
    if isinstance(record.get("config_dir"), str):
        configs, _ = cfgmod.load_dir(Path(record["config_dir"]), trust=_trust(settings))
        register_configured(*configs)


def _err(msg: str) -> None:
    print(f"ts-supervisor: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"ts-supervisor: warning: {msg}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from supervisor.console import LiveTable
    from supervisor.fleet import Fleet, LockedError
    from supervisor.tailscale import BinaryNotFound

    os.umask(0o077)  # everything the supervisor creates is its user's alone (0600, 0700)
    try:
        settings = _settings(args)
    except cfgmod.SettingsError as e:
        for line in e.lines:
            _err(line)
        return EXIT_USAGE
    if not args.config_dir.is_dir():
        _err(f"config dir {args.config_dir} does not exist")
        return EXIT_USAGE
    policy = _trust(settings, settings_path(args))
    if (why := policy.problem(args.config_dir)) is not None:
        _err(f"config dir {args.config_dir}: {why}")
        return EXIT_USAGE
    live = not args.no_console and sys.stdout.isatty()
    fleet = Fleet(args.config_dir, args.data_dir, settings, trust=policy,
                  settings_path=settings_path(args))
    # keys operate the fleet when stdin is a terminal too (`run < /dev/null` only watches)
    table = LiveTable(fleet, Console(), interactive=sys.stdin.isatty()) if live else None
    if table:
        fleet.on_event = table.on_event
    else:
        fleet.on_event = lambda ev: print(ev.line(), flush=True)

    async def main() -> None:
        # An EMFILE storm on any listener (the IPC socket, metrics, the embedded control)
        # is one line per listener and a count per 10 s, not a traceback per failed accept.
        from supervisor.control import limits
        limits.limit_accept_errors(asyncio.get_running_loop(), limits.Summarized(_warn))
        runner = asyncio.create_task(fleet.run())
        ui = None
        if table:
            await asyncio.wait([runner, asyncio.create_task(fleet.started.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if fleet.started.is_set():
                ui = asyncio.create_task(table.run())
        try:
            await runner
        finally:
            if ui:
                ui.cancel()
                await asyncio.gather(ui, return_exceptions=True)

    try:
        asyncio.run(main())
    except (LockedError, BinaryNotFound, trust.Untrusted) as e:
        _err(str(e))
        return EXIT_ERROR
    except OSError as e:  # unwritable, read-only or full data dir: one line, no traceback
        _err(f"data dir {args.data_dir}: {e.strerror}: {e.filename}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from supervisor import ipc
    from supervisor.events import redact_json

    register_secrets(args)
    try:
        answer = redact_json(ipc.call(args.data_dir, "status"))
    except ipc.NotRunning as e:
        _err(str(e))
        return EXIT_NOT_RUNNING
    except PermissionError:
        _err(f"permission denied on {args.data_dir / ipc.SOCKET_NAME} (run as the supervisor's user)")
        return EXIT_ERROR
    except OSError as e:  # ipc.IPCError: an answer that is late, empty, oversize or not JSON
        _err(str(e))
        return EXIT_ERROR
    if not answer.get("ok") or not isinstance(answer.get("proxies"), list):
        _err(str(answer.get("error") or "the supervisor gave no status"))
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"proxies": answer["proxies"],
                          "config_errors": answer.get("config_errors", [])}, indent=2))
        return EXIT_OK
    from rich.console import Console

    from supervisor.console import render
    from supervisor.proxy import ProxySnapshot

    snaps = [ProxySnapshot.from_json(p) for p in answer["proxies"]]
    console = Console()
    console.print(render(snaps, errors=answer.get("config_errors", []), width=console.width))
    return EXIT_OK


def tailscale_version(settings: cfgmod.Settings) -> tuple[int, ...] | None:
    """The version of the tailscale binaries `run` would use, or None if
    they cannot be found, trusted or asked (then nothing is refused by version)."""
    from supervisor.tailscale import Binaries, BinaryNotFound
    try:
        bins = Binaries.locate(settings.tailscale, settings.tailscaled)
        if binary_problems(bins, settings, _trust(settings)):
            return None  # never executed: `run` refuses them, `check` says why
        return cfgmod.parse_version(bins.version())
    except (BinaryNotFound, OSError, subprocess.SubprocessError):
        return None


def binary_problems(bins: Any, settings: cfgmod.Settings, policy: trust.Policy) -> list[str]:
    """One line per tailscale binary root must not execute (trust.py): as found
    by Binaries.locate, and as named by the settings or the environment."""
    named = (settings.tailscale, settings.tailscaled,
             os.environ.get("TS_SUPERVISOR_TAILSCALE"), os.environ.get("TS_SUPERVISOR_TAILSCALED"))
    return trust.binary_problems(policy, (bins.tailscale, bins.tailscaled), named)


def cmd_check(args: argparse.Namespace) -> int:
    """Print one line per problem in the proxy files and the settings file
    (FILE: KEY: REASON) on stdout, a summary on stderr; exit 1 on any problem."""
    problems: list[str] = []
    try:
        settings = _settings(args)
    except cfgmod.SettingsError as e:
        problems += e.lines
        settings = cfgmod.Settings()
    policy = _trust(settings, settings_path(args))
    configs, errors = cfgmod.load_dir(args.config_dir, tailscale_version=tailscale_version(settings),
                                      trust=policy)
    problems = [str(e) for e in errors] + problems
    from supervisor.tailscale import Binaries, BinaryNotFound
    try:
        problems += binary_problems(Binaries.locate(settings.tailscale, settings.tailscaled),
                                    settings, policy)
    except BinaryNotFound:
        pass  # run says so; check judges files
    for line in policy.take_waived() + policy.take_exposed():
        print(f"ts-supervisor: warning: {line}", file=sys.stderr)
    for line in problems:
        print(line)
    names = ", ".join(c.name for c in configs) or "none"
    print(f"{len(configs)} proxy file(s) valid ({names}); {len(problems)} error(s)",
          file=sys.stderr)
    return EXIT_ERROR if problems else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ts-supervisor",
                                description="Keeps many Tailscale proxies alive on one host.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, config: bool = False, data: bool = False) -> None:
        if config:
            sp.add_argument("--config-dir", type=Path, default=Path("conf.d"),
                            help="directory of proxy files NAME.toml (default: conf.d)")
        if data:
            sp.add_argument("--data-dir", type=Path, default=default_data_dir(),
                            help=f"state, logs and sockets (default: {default_data_dir()})")
        sp.add_argument("--settings", type=Path, default=None,
                        help=f"global settings file (default: {SYSTEM_SETTINGS} if present; "
                             "never the working directory)")

    run = sub.add_parser("run", help="run every proxy in the config dir and keep them up")
    common(run, config=True, data=True)
    run.add_argument("--no-console", action="store_true",
                     help="print one line per event instead of the live table")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="show the running supervisor's proxies")
    common(st, data=True)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    ck = sub.add_parser("check", help="validate every proxy file; exit 1 on any error")
    common(ck, config=True)
    ck.set_defaults(func=cmd_check)

    from supervisor import operate
    operate.add_parsers(sub, common)

    from supervisor.control import cli as control_cli
    control_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
