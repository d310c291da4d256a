"""Schemathesis fuzzes every endpoint from the app's own OpenAPI schema against a real `gearshift serve`
process on the real SmolLM2 GGUF: whatever a client sends, the server never answers 5xx (nor dies), and
every 4xx carries an error body."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
schemathesis = pytest.importorskip("schemathesis")

from gearshift.engine.backends.gguf import GGUFBackend  # noqa: E402
from gearshift.engine.config import EngineConfig  # noqa: E402
from gearshift.engine.server.app import build_app  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from server_process import running_server  # noqa: E402

# The schema comes from the app itself (building it loads no model); the cases go to a real server.
_config = EngineConfig(model="smollm2.gguf", engine="gguf", served_model_name="smollm2")
schema = schemathesis.openapi.from_dict(build_app(GGUFBackend(_config), _config).openapi())


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    # A short context and request timeout bound what one generated request can cost (n=128 with no
    # max_tokens...): such cases end as 400 or 408, which the fuzz is allowed to see.
    with running_server(smollm2_gguf, "gguf", "--max-model-len", "64", "--request-timeout", "0.25",
                        "--max-waiting", "4") as s:
        yield s


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, server):
    # Name the served model in every body that names one, so the cases get past the 404 into
    # validation and generation (unknown models are tested in test_server_api.py).
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "smollm2"
    response = case.call(base_url=server.url, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert "error" in response.json(), response.text
    assert server.proc.poll() is None, f"the server died:\n{server.log_tail()}"
