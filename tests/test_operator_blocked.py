"""Pure parts of the operator's refusals: which spec field a rejected child names, what a conflict is,
and that every status shape fits the CRD's status schema (the cluster test asks the real API server)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from gearshift.operator.blocked import conflict, rejected, spec_field
from status_cases import all_statuses

CRD = Path(__file__).resolve().parents[1] / "crds" / "inferenceservices.yaml"
OWNER = {"metadata": {"uid": "u-1", "name": "m"}}
DESIRED = {"kind": "Service", "metadata": {"name": "m"}}


@pytest.mark.parametrize(("message", "field"), [
    ('Deployment.apps "m" is invalid: spec.template.spec.tolerations[0].operator: Unsupported value: "Sometimes"',
     "spec.podTemplate.tolerations[0].operator"),
    ('Deployment.apps "m" is invalid: spec.template.metadata.labels: Invalid value: "not a value!"',
     "spec.podTemplate.labels"),
    ('Deployment.apps "m" is invalid: spec.template.labels: Invalid value: "not a label value!": a valid label',
     "spec.podTemplate.labels"),
    ('Deployment.apps "m" is invalid: [spec.template.spec.affinity.nodeAffinity: Required value, '
     'spec.template.spec.priorityClassName: Invalid]', "spec.podTemplate.affinity.nodeAffinity"),
    ('PersistentVolumeClaim "m-model-cache" is invalid: spec.resources.requests.storage: must be greater than 0',
     "spec.cache.size"),
    ('Deployment.apps "m" is invalid: spec.template.spec.containers[0].image: Required value', None),
    ("admission webhook denied the request", None),
])
def test_spec_field_of_a_rejection(message: str, field: str | None) -> None:
    assert spec_field(message) == field
    r = rejected("Deployment", "m", 422, message)
    assert r.reason == "ApplyRejected"
    assert r.message.startswith(f"{field}: the API server" if field else "the API server rejected Deployment m")


def test_conflict_only_for_objects_we_do_not_control() -> None:
    ours = {"metadata": {"name": "m", "namespace": "ns", "ownerReferences": [{"uid": "u-1", "controller": True}]}}
    assert conflict(DESIRED, None, OWNER) is None
    assert conflict(DESIRED, ours, OWNER) is None
    stranger = {"metadata": {"name": "m", "namespace": "ns"}}
    c = conflict(DESIRED, stranger, OWNER)
    assert c is not None and c.reason == "ChildConflict" and "Service ns/m already exists" in c.message
    # An earlier InferenceService of the same name (another uid) or another controller: not ours either.
    older = {"metadata": {"name": "m", "namespace": "ns",
                          "ownerReferences": [{"uid": "u-0", "controller": True, "kind": "InferenceService", "name": "m"}]}}
    assert "controlled by InferenceService m" in conflict(DESIRED, older, OWNER).message
    # Merely referenced (not as controller) is not control.
    shared = {"metadata": {"name": "m", "namespace": "ns", "ownerReferences": [{"uid": "u-1"}]}}
    assert conflict(DESIRED, shared, OWNER) is not None


def _status_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def _strict(schema: dict) -> dict:
    """OpenAPI's structural schema as JSON Schema: no nulls unless nullable, no fields it does not list."""
    out = {k: v for k, v in schema.items() if k not in ("format", "x-kubernetes-preserve-unknown-fields")}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # the API server would prune it: a silent loss
    if "items" in out:
        out["items"] = _strict(out["items"])
    if out.get("type") == "string":
        out["minLength"] = 1  # a v1.20 API server reads "" in a merge patch as null, and rejects it
    return out


@pytest.mark.parametrize(("label", "status"), all_statuses(), ids=[label for label, _ in all_statuses()])
def test_every_status_shape_fits_the_crd_schema(label: str, status: dict) -> None:
    jsonschema.validate(status, _strict(_status_schema()))


def test_a_signed_url_never_reaches_status_or_events() -> None:
    """InvalidSpec messages become status and Events: a signed URL's token must not travel with them."""
    from gearshift.operator.policy import decide
    from gearshift.operator.spec import InvalidSpec, parse_spec

    def spec(uri: str, **more: object) -> dict:
        return {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": {"uri": uri}, **more}}

    with pytest.raises(InvalidSpec) as e:
        decide(parse_spec(spec("https://h.example/m.safetensors?X-Amz-Signature=s3cr3t", engine="gguf")))
    assert "s3cr3t" not in str(e.value) and "https://h.example/m.safetensors?<redacted>" in str(e.value)
    for uri in ("https://h.example/?sig=s3cr3t", "https://user:s3cr3t@h.example/", "s3://b/m.gguf?sig=s3cr3t"):
        with pytest.raises(InvalidSpec) as e:
            parse_spec(spec(uri))
        assert "s3cr3t" not in str(e.value), str(e.value)
