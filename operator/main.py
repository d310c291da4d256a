"""`gearshift operator`: run the kopf operator in-cluster or against a kubeconfig."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from gearshift.engine.errors import GearshiftError

DEFAULT_IMAGE = "ghcr.io/gearshift-dev/gearshift:0.1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster config, else $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--image", default=os.environ.get("GEARSHIFT_IMAGE", DEFAULT_IMAGE),
                        help="image the model server pods run (default: $GEARSHIFT_IMAGE)")
    parser.add_argument("--resync-seconds", type=float, default=300.0,
                        help="how often everything is checked for drift the watches missed")
    parser.add_argument("--scrape-seconds", type=float, default=10.0,
                        help="how often each ready model pod's /metrics is read for the observed load (0: never)")
    parser.add_argument("--liveness", default=None, help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--always-apply", action="store_true",
                        help="re-apply every child on every reconcile (the naive baseline bench/operator.py compares)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log kopf's own activity too")


def _load_config(kubeconfig: str | None) -> Any:
    import kubernetes

    cfg = kubernetes.client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=cfg)
        else:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (kubernetes.config.ConfigException, OSError) as e:
        raise GearshiftError(f"no Kubernetes configuration: {e}") from None
    cfg.connection_pool_maxsize = 32  # reconciles run on kopf's worker threads, in parallel
    return kubernetes.client.ApiClient(cfg)


def _connection_info(cfg: Any) -> Any:
    """kopf's credentials from the kubernetes client's configuration we loaded (kubeconfig or in-cluster;
    kopf's own login_via_client would load the default kubeconfig instead of --kubeconfig)."""
    import kopf

    # get_api_key_with_prefix runs the client's refresh hook: rotated in-cluster tokens are re-read.
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None,
        scheme=scheme or ("Bearer" if token else None), token=token or None,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


def run(args: argparse.Namespace) -> int:
    import kopf
    from gearshift.operator import handlers
    from gearshift.operator.apply import Kube, KubeError
    from gearshift.operator.reconcile import Reconciler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    kube = Kube(_load_config(args.kubeconfig))
    try:
        hpa_version = kube.served_version("autoscaling", ["v2", "v2beta2"])
        pdb_version = kube.served_version("policy", ["v1", "v1beta1"])
    except (KubeError, OSError) as e:
        raise GearshiftError(f"cannot reach the API server: {e}") from None
    logging.getLogger("gearshift.operator").info(
        "image %s; HPA %s; PDB %s; namespaces %s", args.image, hpa_version, pdb_version,
        ", ".join(args.namespace) or "all")

    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(kube, args.image, hpa_version, pdb_version, always_apply=args.always_apply,
                            namespaces=args.namespace)
    handlers.register(registry, reconciler, args.resync_seconds)
    if args.scrape_seconds > 0:
        import threading

        from gearshift.operator.scrape import Scraper

        threading.Thread(target=Scraper(reconciler, args.scrape_seconds).loop, daemon=True,
                         name="gearshift-scrape").start()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return _connection_info(kube.api.configuration)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Whatever kopf would persist lives under our own group, not kopf.zalando.org.
        settings.persistence.finalizer = "gearshift.dev/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gearshift.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="gearshift.dev", key="last-handled-configuration")
        settings.posting.enabled = False  # our Events are explicit decisions, not log lines
        settings.scanning.disabled = True  # no CRD watching: least privilege
        settings.execution.max_workers = 8
        settings.watching.server_timeout = 600
        handlers.select_children_server_side(settings, reconciler)

    kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace,
             namespaces=args.namespace, liveness_endpoint=args.liveness)
    return 0
