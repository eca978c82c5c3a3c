"""Read the instance's totals for the status page from its Prometheus metrics.

One worker: its own registry. Several workers (``PROMETHEUS_MULTIPROC_DIR``
set by the supervisor): every worker's files added up, exactly what
``/metrics`` serves, so the page shows the instance whichever worker answers.

Only the few series the page draws are kept, flattened to ``Key`` tuples:

- ``("decisions", rule, result)`` and ``("whatif", rule, result)``
- ``("whatif_requests", live, candidate)``
- ``("requests", status_class)`` and ``("redirects", status)``
- ``("storage_le", bound)`` cumulative buckets of the rate-limit storage latency,
  ``("storage_count",)``, ``("storage_errors",)``, ``("breaker_open",)`` (1 if any
  worker's breaker is open)
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.metrics import Metrics, multiprocess_dir
from proxy.status.series import Key


def families(metrics: Metrics) -> Iterable[Metric]:
    directory = multiprocess_dir()
    if directory:
        collector = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        found: Iterable[Metric] = collector.collect()  # type: ignore[no-untyped-call]
        return found
    return metrics.registry.collect()


def read_totals(metrics: Metrics) -> dict[Key, float]:
    return totals_of(families(metrics))


def totals_of(metric_families: Iterable[Metric]) -> dict[Key, float]:
    out: dict[Key, float] = {}

    def add(key: Key, value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    for family in metric_families:
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "sluice_ratelimit_decisions_total":
                add(("decisions", labels["rule"], labels["result"]), value)
            elif name == "sluice_whatif_decisions_total":
                add(("whatif", labels["rule"], labels["result"]), value)
            elif name == "sluice_whatif_requests_total":
                add(("whatif_requests", labels["live"], labels["candidate"]), value)
            elif name == "sluice_requests_total":
                add(("requests", labels["status_class"]), value)
            elif name == "sluice_redirects_total":
                add(("redirects", labels["status"]), value)
            elif name == "sluice_storage_latency_seconds_bucket":
                if labels.get("op") == "ratelimit":
                    add(("storage_le", labels["le"]), value)
            elif name == "sluice_storage_latency_seconds_count":
                if labels.get("op") == "ratelimit":
                    add(("storage_count",), value)
            elif name == "sluice_storage_errors_total":
                add(("storage_errors",), value)
            elif name == "sluice_storage_breaker_open":
                out[("breaker_open",)] = max(out.get(("breaker_open",), 0.0), value)
    return out
