"""manifests/monitoring/: the rules, their unit tests and the dashboard, checked with the real promtool
(Debian's `prometheus` package; `make test` installs it). Run as a script to regenerate
prometheusrule.yaml from rules.yaml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

MON = Path(__file__).resolve().parent.parent / "manifests" / "monitoring"
# Dashboard variables as Grafana expands them with "All" selected.
GRAFANA_VARS = {"$namespace": ".*", "$inferenceservice": ".*", "${datasource}": "prometheus"}


def promtool(*args: str, cwd: Path = MON) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def render_prometheus_rule() -> str:
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "gearshift",
                        "labels": {"app.kubernetes.io/part-of": "gearshift", "role": "alert-rules"}},
           "spec": yaml.safe_load((MON / "rules.yaml").read_text())}
    head = ("# The rules of rules.yaml for the Prometheus Operator, generated: "
            "`python tests/test_monitoring.py` rewrites it.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, width=200)


def dashboard_queries() -> list[str]:
    dash = json.loads((MON / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def expand(expr: str) -> str:
    """A panel query as Grafana sends it; label_values(m, l) becomes the series selector it runs."""
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    m = re.fullmatch(r"label_values\((.+), *(\w+)\)", expr)
    return m.group(1) if m else expr


def test_rules_are_valid() -> None:
    r = promtool("check", "rules", "rules.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_unit_tests_pass() -> None:
    r = promtool("test", "rules", "tests/rules_test.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_operator_rule_is_the_plain_file() -> None:
    assert (MON / "prometheusrule.yaml").read_text() == render_prometheus_rule()


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression: a typo in a panel fails here."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": expand(e)} for i, e in enumerate(dashboard_queries())]}]}
    (tmp_path / "dash_rules.yaml").write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(tmp_path / "dash_rules.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_reads_only_series_that_exist() -> None:
    """Every recording-rule name a panel reads is recorded by rules.yaml (a renamed rule would leave a
    panel silently empty)."""
    recorded = {r["record"] for g in yaml.safe_load((MON / "rules.yaml").read_text())["groups"]
                for r in g["rules"] if "record" in r}
    used = {m for e in dashboard_queries() for m in re.findall(r"namespace_inferenceservice:[\w:]+", e)}
    assert used and used <= recorded, used - recorded


def test_crossover_in_rules_and_dashboard_is_the_operators() -> None:
    """The alert and the dashboard compare with the crossover the pods report (engine/crossover.py, per CPU
    class); where a pod reports none, the rule's fallback is the operator's default."""
    from gearshift.operator.load import DEFAULT_CROSSOVER

    rules: dict[str, Any] = yaml.safe_load((MON / "rules.yaml").read_text())
    by_name = {r.get("alert") or r.get("record"): r for g in rules["groups"] for r in g["rules"]}
    recorded = by_name["namespace_inferenceservice:gearshift_crossover_concurrency:max"]["expr"]
    assert "gearshift:crossover_concurrency" in recorded
    assert re.findall(r"\* 0 \+ (\d+)", recorded) == [str(DEFAULT_CROSSOVER.value)], recorded
    advice = by_name["GearshiftGearAdviceHeld"]["expr"]
    assert re.search(r">= on \(namespace, inferenceservice\) group_left\s+"
                     r"namespace_inferenceservice:gearshift_crossover_concurrency:max$", advice), advice
    assert not re.search(r">=\s*\d", advice)  # no literal crossover left
    assert any("gearshift_crossover_concurrency:max" in q for q in dashboard_queries())
    assert not any(q.startswith("vector(") for q in dashboard_queries())


def test_the_e2e_prometheus_config_is_valid_and_keeps_the_users_relabelling(tmp_path: Path) -> None:
    """The e2e swaps only the discovery (Debian's Prometheus has no Kubernetes SD) for HTTP SD."""
    from gearshift.e2e.cluster.prometheus import config

    cfg = config("http://127.0.0.1:1/pods")
    users = yaml.safe_load((MON / "prometheus-scrape.yaml").read_text())
    assert [j["relabel_configs"] for j in cfg["scrape_configs"]] == [j["relabel_configs"] for j in users]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


if __name__ == "__main__":
    (MON / "prometheusrule.yaml").write_text(render_prometheus_rule())
    sys.exit(0)
