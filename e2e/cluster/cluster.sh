#!/usr/bin/env bash
# The local control plane by hand: cluster.sh up|down|status|kubeconfig (see local.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONSAFEPATH=1
export PYTHONPATH="$root/e2e/pythonpath"  # gearshift.e2e.* lives in the source tree, not the wheel
exec "$root/.venv/bin/python" -m gearshift.e2e.cluster "$@"
