"""`python -m gearshift.e2e.cluster up|down|status|kubeconfig`: the local control plane by hand."""

from __future__ import annotations

import sys

from gearshift.e2e.cluster import local


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "status"
    try:
        if cmd == "up":
            path = local.ensure_cluster()
            print(f"cluster up: export KUBECONFIG={path}")
        elif cmd == "down":
            local.down()
            print("cluster down")
        elif cmd == "status":  # exit 0 when our processes run, even if the API is slow to answer
            if not local.alive():
                print("not running")
                return 1
            print("running" if local.running() else "running (the API does not answer yet)")
        elif cmd == "kubeconfig":
            print(local.KUBECONFIG)
        else:
            print(f"usage: python -m gearshift.e2e.cluster up|down|status|kubeconfig (not {cmd!r})",
                  file=sys.stderr)
            return 2
    except local.ClusterError as e:
        print(f"cluster {cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
