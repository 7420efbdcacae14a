"""Chooses the metrics recorder: Prometheus when asked for, else one that does nothing.

Apart from `metrics`, so that the Prometheus module (which needs the optional prometheus_client and
reads `metrics.Snapshot`) is imported only from here, and only when --metrics-port is given.
"""

from __future__ import annotations

from softprompt.server.observability.metrics import Metrics, NoMetrics


def create_metrics(enabled: bool) -> Metrics:
    """A Prometheus recorder when `enabled` (importing prometheus_client only then), else `NoMetrics`."""
    if not enabled:
        return NoMetrics()
    try:
        from softprompt.server.observability.prometheus import PrometheusMetrics
    except ImportError as exc:
        if exc.name != "prometheus_client":
            raise
        raise RuntimeError(
            "--metrics-port needs prometheus_client: pip install 'softprompt[server]' (or prometheus-client)"
        ) from exc
    return PrometheusMetrics()
