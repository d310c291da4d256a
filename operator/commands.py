"""The operator's `gearshift` sub-commands, registered with the CLI (engine/cli.py) through the
`gearshift.commands` entry point group in pyproject.toml. Adding a sub-command: one line here.

name -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("gearshift.operator.local_up", "decide the engine for an InferenceService file and serve it here"),
    "plan": ("gearshift.operator.plan", "print the engine decision and child manifests for an InferenceService"),
    "operator": ("gearshift.operator.main", "run the Kubernetes operator (in-cluster or with a kubeconfig)"),
}
