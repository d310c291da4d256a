"""`python -m gearshift.e2e.node --kubeconfig K [--name N] [--root DIR] [--no-taint]`: run the test node
agent until SIGTERM / Ctrl-C (then every pod process is killed and the Node deleted)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from gearshift.e2e.node.agent import NodeAgent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gearshift.e2e.node", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--name", default=f"e2e-{socket.gethostname()}")
    p.add_argument("--root", default=".cache/e2e/node", help="per-pod directories, claims and logs")
    p.add_argument("--no-taint", action="store_true",
                   help="let any pod schedule here (by default only pods tolerating gearshift.dev/e2e-node)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = NodeAgent(args.kubeconfig, args.name, Path(args.root).resolve(), taint=not args.no_taint)
    agent.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
