"""`gearshift` command line. Each sub-command lives in its own module, imported only when it runs.

A sub-command module exposes `add_arguments(parser)` and `run(args) -> int`. Errors that are the
user's (GearshiftError) print one line and exit 2; nothing prints a traceback at the user.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gearshift.engine.server.launch", "serve a model behind an OpenAI-compatible API"),
    "up": ("gearshift.operator.local_up", "decide the engine for an InferenceService file and serve it here"),
    "plan": ("gearshift.operator.plan", "print the engine decision and child manifests for an InferenceService"),
    "bench": ("gearshift.engine.benchmark", "measure offline throughput of the paged engine on a model"),
    "operator": ("gearshift.operator.main", "run the Kubernetes operator (in-cluster or with a kubeconfig)"),
    "fetch": ("gearshift.engine.fetch", "download a model URI into a directory (the pods' init container)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="gearshift",
        description="Serve open-weight LLMs; pick the engine for the load.",
    )
    from gearshift.engine import __version__

    parser.add_argument("--version", action="version", version=f"gearshift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in COMMANDS.items():
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
