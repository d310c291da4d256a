"""A real Prometheus scrapes both engines on the real node the way users configure it (manifests/monitoring/
prometheus-scrape.yaml: pod discovery + the scrape annotations our pods carry), evaluates the recording
rules of manifests/monitoring/rules.yaml on the live series, and every query of the Grafana dashboard
returns data. One gguf and one paged resource serve a little traffic through their Services."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gearshift.e2e.cluster.scenario import LOAD_S, MODEL_FILE, chat, spec
from gearshift.e2e.cluster.wait import wait_for
from gearshift.engine.crossover import crossover, node_cpu_class

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MON = Path(__file__).resolve().parent.parent / "manifests" / "monitoring"
ENGINES = {"prom-gguf": ("gguf", 1), "prom-paged": ("paged", 32)}  # name: (engine, declared concurrency)


@pytest.fixture(scope="module")
def prometheus(api, node, tmp_path_factory) -> Iterator:
    from gearshift.e2e.cluster.prometheus import Prometheus

    prom = Prometheus(api, tmp_path_factory.mktemp("prometheus"))
    yield prom
    prom.close()


@pytest.fixture(scope="module")
def serving(kube, model_url, prometheus) -> dict[str, str]:
    """Both resources Ready and answering a few requests each (concurrently, so the running gauges move)."""
    for name, (_, conc) in ENGINES.items():
        kube.create(name, spec(model_url(MODEL_FILE), conc))
    for name, (engine, _) in ENGINES.items():
        wait_for(lambda n=name: kube.is_ready(n), LOAD_S, f"{name} Ready")
        assert kube.isvc(name)["status"]["engine"] == engine
    for name in ENGINES:
        ip = kube.service_ip(name)
        with ThreadPoolExecutor(4) as pool:
            assert all(t.strip() for t in pool.map(lambda _, ip=ip: chat(ip, max_tokens=16), range(8)))
    return {name: engine for name, (engine, _) in ENGINES.items()}


def test_series_carry_the_labels_people_filter_by_for_both_engines(kube, prometheus, serving):
    found = prometheus.wait_for(f'gearshift:generation_tokens_total{{namespace="{kube.ns}"}} > 0',
                                until=lambda r: {s["metric"]["inferenceservice"] for s in r} == set(serving))
    by_resource = {s["metric"]["inferenceservice"]: s["metric"] for s in found}
    assert set(by_resource) == set(serving), by_resource
    for name, labels in by_resource.items():
        assert labels["engine"] == serving[name]
        assert labels["namespace"] == kube.ns
        assert labels["model_name"] == "smollm2"
        assert labels["pod"].startswith(name)
        assert labels["job"] == "gearshift-models"


def test_recording_rules_are_evaluated_on_live_series(kube, prometheus, serving):
    sel = f'{{namespace="{kube.ns}"}}'
    def every_resource(r: list[dict]) -> bool:
        return {s["metric"]["inferenceservice"] for s in r} == set(serving)

    tokens = prometheus.wait_for(f"namespace_inferenceservice:gearshift_output_tokens_per_second:rate1m{sel} > 0",
                                 until=every_resource)
    assert {s["metric"]["engine"] for s in tokens} == {"gguf", "paged"}
    for rule in ("replicas_up:sum", "concurrent_requests:sum", "queue_depth:sum", "kv_cache_usage:max",
                 "ttft_seconds:p50", "itl_seconds:p95"):
        prometheus.wait_for(f"namespace_inferenceservice:gearshift_{rule}{sel}", until=every_resource)
    up = prometheus.query(f"namespace_inferenceservice:gearshift_replicas_up:sum{sel}")
    assert all(float(s["value"][1]) == 1 for s in up), up
    # both engines' pods report the crossover of the node's CPU (the node is this machine), which the
    # GearAdvice alert compares with
    crossovers = prometheus.wait_for(f"namespace_inferenceservice:gearshift_crossover_concurrency:max{sel}",
                                     until=every_resource)
    assert {float(s["value"][1]) for s in crossovers} == {crossover(node_cpu_class())}, crossovers


def test_every_dashboard_query_returns_data(kube, prometheus, serving):
    dash = json.loads((MON / "dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$namespace", kube.ns).replace("$inferenceservice", ".*")
            assert prometheus.wait_for(expr, timeout_s=90), (panel["title"], expr)


def test_cleanup(kube):
    for name in ENGINES:
        kube.delete(name)
