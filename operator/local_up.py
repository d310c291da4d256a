"""`gearshift up -f isvc.yaml`: the operator's decision, served on this machine (no cluster)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import GearshiftError
from gearshift.engine.settings import add_arguments as add_settings
from gearshift.operator import builders
from gearshift.operator.plan import plan_one, read_services, unsupported_note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="InferenceService YAML ('-' for stdin)")
    add_settings(parser, EngineConfig, ("host", "port"))  # as `gearshift serve` takes them
    parser.add_argument("--models-dir", default=os.path.expanduser("~/.cache/gearshift/models"),
                        help="where https:// and hf:// models are downloaded")
    parser.add_argument("--dry-run", action="store_true", help="print the decision and the command, serve nothing")


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def run(args: argparse.Namespace) -> int:
    objs = read_services(args.filename)
    if len(objs) != 1:
        raise GearshiftError(f"{args.filename} holds {len(objs)} InferenceServices; `up` serves one")
    spec, plan, unsupported = plan_one(objs[0], args.models_dir)
    note = unsupported_note(plan, unsupported)
    if note:
        raise GearshiftError(f"{spec.name}: {note}")
    notes = []
    if plan.device == "cuda" and not _has_cuda():
        plan = replace(plan, device="cpu")
        notes.append("no CUDA device here: the paged engine runs on CPU")
    uri = spec.model.uri
    if uri.scheme == "pvc":
        raise GearshiftError(f"{uri.uri}: pvc:// models exist in a cluster only; use file://, https:// or hf://")
    print(f"gearshift up: {spec.name}: engine {plan.engine} -- {plan.reason}", file=sys.stderr)
    for note in notes:
        print(f"gearshift up: note: {note}", file=sys.stderr)
    if args.dry_run:
        model = uri.path if uri.scheme == "file" else str(Path(args.models_dir) / uri.local_name)
        print(" ".join(["gearshift", *builders.serve_args(spec, plan, model, args.host, args.port)]))
        return 0
    if uri.scheme == "file":
        model = uri.path
        if not Path(model).exists():
            raise GearshiftError(f"{model} does not exist")
    else:
        from gearshift.engine.fetch import fetch

        model = str(fetch(uri.uri, Path(args.models_dir), sha256=spec.model.sha256))
    from gearshift.engine.cli import main

    print(f"gearshift up: starting the {plan.engine} engine on {model} ({_size(Path(model))}); it answers "
          f"http://{args.host}:{args.port}/ready once loaded, its load progress follows", file=sys.stderr, flush=True)
    return main(builders.serve_args(spec, plan, model, args.host, args.port))


def _size(path: Path) -> str:
    """What there is to load: a file's size, or a model directory's weights."""
    files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.gguf")]
    return f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"
