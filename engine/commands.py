"""The engine's `gearshift` sub-commands: the table engine/cli.py reads through the entry point."""

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gearshift.engine.server.launch", "serve a model behind an OpenAI-compatible API"),
    "bench": ("gearshift.engine.benchmark", "measure offline throughput of the paged engine on a model"),
    "fetch": ("gearshift.engine.fetch", "download a model URI into a directory (the pods' init container)"),
}
