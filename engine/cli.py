"""`gearshift` command line: the one entry point both packages register their sub-commands with.

This module names no package: each registers a `name -> (module, help)` table (engine/commands.py,
operator/commands.py) under the `gearshift.commands` entry point group in pyproject.toml, so neither
`gearshift.engine` nor `gearshift.operator` imports the other to be on the command line.
A sub-command module exposes `add_arguments(parser)` and `run(args) -> int`. Errors that are the
user's (GearshiftError) print one line and exit 2; nothing prints a traceback at the user.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

GROUP = "gearshift.commands"


def registered_commands() -> dict[str, tuple[str, str]]:
    """name -> (module, one-line help), from every installed package's registration, in package order."""
    out: dict[str, tuple[str, str]] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        for name, entry in ep.load().items():
            if name in out:
                raise RuntimeError(f"sub-command {name!r} is registered twice ({out[name][0]}, {entry[0]})")
            out[name] = entry
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="gearshift",
        description="Serve open-weight LLMs; pick the engine for the load.",
    )
    from gearshift.engine import __version__

    parser.add_argument("--version", action="version", version=f"gearshift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    commands = registered_commands()
    if not commands:
        parser.epilog = "no sub-commands are registered: reinstall the package (pip install -e .)"
    for name, (module_name, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("gearshift"):
                raise
            continue  # not built yet: the sub-command is listed but says so when run
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from gearshift.engine.errors import GearshiftError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = modules.get(args.command)
    if module is None:
        print(f"gearshift: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except GearshiftError as e:
        print(f"gearshift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
