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

from supervisor import __version__
from supervisor import config as cfgmod

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


def default_data_dir() -> Path:
    """$TS_SUPERVISOR_DATA_DIR, else /var/lib/ts-supervisor for root (a NAS
    service), else $XDG_STATE_HOME/ts-supervisor (~/.local/state/ts-supervisor)."""
    if env := os.environ.get("TS_SUPERVISOR_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/ts-supervisor")
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "ts-supervisor"


def _settings(args: argparse.Namespace) -> cfgmod.Settings:
    path = args.settings
    if path is None and Path("ts-supervisor.toml").is_file():
        path = Path("ts-supervisor.toml")
    return cfgmod.load_settings(path)


def _err(msg: str) -> None:
    print(f"ts-supervisor: error: {msg}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from supervisor.console import LiveTable
    from supervisor.fleet import Fleet, LockedError
    from supervisor.tailscale import BinaryNotFound

    try:
        settings = _settings(args)
    except cfgmod.SettingsError as e:
        for line in e.lines:
            _err(line)
        return EXIT_USAGE
    if not args.config_dir.is_dir():
        _err(f"config dir {args.config_dir} does not exist")
        return EXIT_USAGE
    live = not args.no_console and sys.stdout.isatty()
    fleet = Fleet(args.config_dir, args.data_dir, settings)
    # keys operate the fleet when stdin is a terminal too (`run < /dev/null` only watches)
    table = LiveTable(fleet, Console(), interactive=sys.stdin.isatty()) if live else None
    if table:
        fleet.on_event = table.on_event
    else:
        fleet.on_event = lambda ev: print(ev.line(), flush=True)

    async def main() -> None:
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
    except (LockedError, BinaryNotFound) as e:
        _err(str(e))
        return EXIT_ERROR
    except OSError as e:  # unwritable, read-only or full data dir: one line, no traceback
        _err(f"data dir {args.data_dir}: {e.strerror}: {e.filename}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from supervisor import ipc

    try:
        answer = ipc.call(args.data_dir, "status")
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
    they cannot be found or asked (then nothing is refused by version)."""
    from supervisor.tailscale import Binaries, BinaryNotFound
    try:
        return cfgmod.parse_version(Binaries.locate(settings.tailscale, settings.tailscaled).version())
    except (BinaryNotFound, OSError, subprocess.SubprocessError):
        return None


def cmd_check(args: argparse.Namespace) -> int:
    """Print one line per problem in the proxy files and the settings file
    (FILE: KEY: REASON) on stdout, a summary on stderr; exit 1 on any problem."""
    problems: list[str] = []
    try:
        settings = _settings(args)
    except cfgmod.SettingsError as e:
        problems += e.lines
        settings = cfgmod.Settings()
    configs, errors = cfgmod.load_dir(args.config_dir, tailscale_version=tailscale_version(settings))
    problems = [str(e) for e in errors] + problems
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
                        help="global settings file (default: ./ts-supervisor.toml if present)")

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
