"""The operator's `gearshift` sub-commands: the table engine/cli.py reads through the entry point."""

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("gearshift.operator.local_up", "decide the engine for an InferenceService file and serve it here"),
    "plan": ("gearshift.operator.plan", "print the engine decision and child manifests for an InferenceService"),
    "operator": ("gearshift.operator.main", "run the Kubernetes operator (in-cluster or with a kubeconfig)"),
}
