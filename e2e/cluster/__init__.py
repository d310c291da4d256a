"""The local Kubernetes control plane for tests (`ensure_cluster()` in `local.py`)."""
