"""Report -> Prometheus text exposition, built with prometheus_client on a fresh registry per scrape.

A fresh CollectorRegistry per scrape (rather than process-wide gauges that are set and reset) means a
model or version that disappeared from the swarm disappears from the metrics too, and nothing is shared
with other code that uses the default registry.

Metrics (all gauges):
  swarm_peers{status}                          peers by status (summary.STATUSES)
  swarm_peers_by_version{version}              peers by announced software version
  swarm_models                                 models announced
  swarm_models_runnable                        models whose every block has an online peer
  swarm_compute_tokens_per_second              sum of online peers' measured throughput
  swarm_network_megabits_per_second            sum of online peers' measured bandwidth
  swarm_model_blocks{model}                    number of blocks
  swarm_model_blocks_covered{model}            blocks with at least one online peer
  swarm_model_min_replication{model}           fewest online peers on any block
  swarm_model_can_run{model}                   1 if every block is covered, else 0
  swarm_model_peers{model}                     peers announcing the model
  swarm_model_compute_tokens_per_second{model} sum of the model's online peers' throughput
  swarm_health_snapshot_age_seconds            age of the data behind this scrape (NaN before the first crawl)
  swarm_health_crawl_duration_seconds          duration of the last crawl
  swarm_health_crawl_ok                        1 if the last crawl had no error
  swarm_health_skipped_entries                 DHT entries skipped as inconsistent in the last crawl
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bootstrap.health.summary import STATUSES, Report


class _ReportCollector(Collector):
    def __init__(self, report: Report, now: float):
        self.report = report
        self.now = now

    def collect(self):
        r, t = self.report, self.report.totals
        peers = GaugeMetricFamily("swarm_peers", "Peers by status", labels=["status"])
        for status in STATUSES:
            peers.add_metric([status], t.peers_by_status.get(status, 0))
        versions = GaugeMetricFamily(
            "swarm_peers_by_version", "Peers by software version", labels=["version"]
        )
        for version, count in t.peers_by_version.items():
            versions.add_metric([version], count)
        yield peers
        yield versions
        yield GaugeMetricFamily("swarm_models", "Models announced", value=t.models)
        yield GaugeMetricFamily(
            "swarm_models_runnable", "Models with every block online", value=t.models_runnable
        )
        yield GaugeMetricFamily(
            "swarm_compute_tokens_per_second", "Online peers' throughput, summed", value=t.compute_tokens_s
        )
        yield GaugeMetricFamily(
            "swarm_network_megabits_per_second", "Online peers' bandwidth, summed", value=t.network_mbps
        )
        yield from self._per_model()
        age = math.nan if r.snapshot_at is None else max(0.0, self.now - r.snapshot_at)
        yield GaugeMetricFamily(
            "swarm_health_snapshot_age_seconds", "Age of the crawl behind this scrape", value=age
        )
        yield GaugeMetricFamily(
            "swarm_health_crawl_duration_seconds",
            "Duration of the last crawl",
            value=math.nan if r.crawl_s is None else r.crawl_s,
        )
        yield GaugeMetricFamily(
            "swarm_health_crawl_ok",
            "1 if the last crawl had no error",
            value=float(r.snapshot_at is not None and r.crawl_error is None),
        )
        yield GaugeMetricFamily(
            "swarm_health_skipped_entries", "DHT entries skipped as inconsistent", value=r.skipped_entries
        )

    def _per_model(self):
        families = {
            "blocks": GaugeMetricFamily("swarm_model_blocks", "Blocks of the model", labels=["model"]),
            "covered": GaugeMetricFamily(
                "swarm_model_blocks_covered", "Blocks with an online peer", labels=["model"]
            ),
            "min_rep": GaugeMetricFamily(
                "swarm_model_min_replication", "Fewest online peers on any block", labels=["model"]
            ),
            "can_run": GaugeMetricFamily(
                "swarm_model_can_run", "1 if every block is covered", labels=["model"]
            ),
            "peers": GaugeMetricFamily("swarm_model_peers", "Peers announcing the model", labels=["model"]),
            "tps": GaugeMetricFamily(
                "swarm_model_compute_tokens_per_second",
                "The model's online throughput, summed",
                labels=["model"],
            ),
        }
        for m in self.report.models:
            label = [m.model_id]
            families["blocks"].add_metric(label, m.num_blocks)
            families["covered"].add_metric(label, m.blocks_covered)
            families["min_rep"].add_metric(label, m.min_replication)
            families["can_run"].add_metric(label, float(m.can_run))
            families["peers"].add_metric(label, len(m.peer_ids))
            families["tps"].add_metric(label, m.compute_tokens_s)
        yield from families.values()


def report_metrics(report: Report, now: float) -> bytes:
    """The Prometheus text format (CONTENT_TYPE_LATEST) of `report`, scraped at unix time `now`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(report, now))
    return generate_latest(registry)
