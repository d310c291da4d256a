"""`gearshift plan -f isvc.yaml`: the engine decision and the child manifests, with no cluster.

The output is YAML (the decision as a comment), so it can be reviewed or piped to `kubectl diff -f -`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml
from gearshift.engine.errors import GearshiftError
from gearshift.engine.loader.architecture import paged_unsupported
from gearshift.operator import builders
from gearshift.operator.main import DEFAULT_IMAGE
from gearshift.operator.observe import plan_notes
from gearshift.operator.policy import EnginePlan, decide
from gearshift.operator.spec import KIND, InferenceServiceSpec, parse_spec


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # manifests never use anchors
        return True


def dump(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def read_services(path: str) -> list[dict[str, Any]]:
    """The InferenceService documents in a YAML file ('-' for stdin)."""
    try:
        if path == "-":
            docs = list(yaml.safe_load_all(sys.stdin))
        else:
            with open(path) as f:
                docs = list(yaml.safe_load_all(f))
    except OSError as e:
        raise GearshiftError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise GearshiftError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not found:
        raise GearshiftError(f"{path} holds no {KIND}")
    return found


def local_model_path(spec: InferenceServiceSpec, models_dir: str | None) -> str | None:
    """Where the model is on this machine, if it is already here (file://, or fetched before)."""
    uri = spec.model.uri
    if uri.scheme == "file":
        return uri.path
    if models_dir and uri.scheme != "pvc" and os.path.exists(os.path.join(models_dir, uri.local_name)):
        return os.path.join(models_dir, uri.local_name)
    return None


def plan_one(obj: dict[str, Any], models_dir: str | None = None) -> tuple[InferenceServiceSpec, EnginePlan, str | None]:
    """(spec, plan, architecture the paged engine cannot run or None). The architecture is read from the
    model when it is on this machine, so the decision is the one the operator reaches once a pod has
    reported it."""
    spec = parse_spec(obj)
    path = local_model_path(spec, models_dir)
    unsupported = paged_unsupported(path) if path else None
    return spec, decide(spec, unsupported), unsupported


def unsupported_note(plan: EnginePlan, unsupported: str | None) -> str | None:
    """One line when the plan still runs the paged engine on a model it cannot load, else None."""
    if unsupported and plan.engine == "paged":
        return (f"the paged engine does not implement architecture {unsupported!r}: its pods would stop with "
                "UnsupportedModel; use a GGUF file with engine gguf (CPU)")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="InferenceService YAML ('-' for stdin)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image of the model server pods")
    parser.add_argument("--hpa-version", default="autoscaling/v2", choices=["autoscaling/v2", "autoscaling/v2beta2"])
    parser.add_argument("--pdb-version", default="policy/v1", choices=["policy/v1", "policy/v1beta1"])
    parser.add_argument("--models-dir", default=os.path.expanduser("~/.cache/gearshift/models"),
                        help="where fetched models are looked for, to read their architecture")


def run(args: argparse.Namespace) -> int:
    out = []
    for obj in read_services(args.filename):
        spec, plan, unsupported = plan_one(obj, args.models_dir)
        note = unsupported_note(plan, unsupported)
        if note:
            out.append(f"# warning: {note}\n")
        out.append(f"# {spec.namespace}/{spec.name}: engine {plan.engine} -- {plan.reason}\n"
                   f"# sizing: max sequences {plan.max_num_seqs}, threads {plan.threads}, "
                   f"kv cache {plan.kv_cache_memory if plan.kv_cache_memory is not None else 'auto'}, "
                   f"requests {plan.requests}\n" + "".join(f"# note: {n}\n" for n in plan_notes(spec)))
        owner = obj if (obj.get("metadata") or {}).get("uid") else None
        out.append(dump(builders.children(spec, plan, args.image, owner, args.hpa_version, args.pdb_version)))
    sys.stdout.write("---\n".join(out))
    return 0
