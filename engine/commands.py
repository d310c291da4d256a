"""The engine's `gearshift` sub-commands, registered with the CLI (engine/cli.py) through the
`gearshift.commands` entry point group in pyproject.toml. Adding a sub-command: one line here.

name -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gearshift.engine.server.launch", "serve a model behind an OpenAI-compatible API"),
    "bench": ("gearshift.engine.benchmark", "measure offline throughput of the paged engine on a model"),
    "fetch": ("gearshift.engine.fetch", "download a model URI into a directory (the pods' init container)"),
}
