"""The cluster's metrics: every engine replica's latest report and the autoscaler's decisions, held by one
named Ray actor (`ClusterStats`), and their Prometheus text for the ingress's /metrics (`render`).

Replicas push their own /metrics text and signals every second or so; the autoscaling policy, which runs
inside Ray Serve's controller, pushes each scale-up or scale-down. /metrics then shows

* every family a single `qserve serve` exports (DESIGN §4), each sample labelled ``replica="<id>"``;
* ``qserve_replicas`` (replicas reporting), ``qserve_desired_replicas`` (the autoscaler's last decision),
  ``qserve_autoscaling_decisions_total{direction="up"|"down"}``;
* ``qserve_routing_decisions_total{reason}`` (the ingress's router: affinity, new_session, overflow,
  headroom, random);
* ``qserve_cluster_admission_headroom_sequences`` (the replicas' sum) and
  ``qserve_cluster_prefix_cache_hit_rate`` (the replicas' hit rates weighted by their prompt tokens).

The class is plain Python; `actor` makes it the named detached actor (created once, found by name).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

STALE_S = 30.0  # a replica that has not reported for this long is gone (crashed; a stopped one says so)
DIRECTIONS = ("up", "down")


class ClusterStats:
    """What /metrics shows about the cluster. Every method is called remotely (one at a time: a Ray actor)."""

    def __init__(self, desired: int | None = None):
        self._replicas: dict[str, tuple[float, str, dict[str, float]]] = {}
        self._decisions: Counter[str] = Counter()
        self._desired = desired
        self._history: deque[dict[str, Any]] = deque(maxlen=100)

    def report_replica(self, replica_id: str, metrics_text: str, stats: dict[str, float]) -> None:
        """A replica's current /metrics text and signals (a snapshot of its engine's metrics)."""
        self._replicas[replica_id] = (time.monotonic(), metrics_text, stats)

    def remove_replica(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def record_decision(self, record: dict[str, Any]) -> None:
        """One autoscaling decision: {time, from, to, direction, reason}."""
        self._decisions[record["direction"]] += 1
        self._desired = int(record["to"])
        self._history.append(record)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        for rid in [r for r, (t, _, _) in self._replicas.items() if now - t > STALE_S]:
            del self._replicas[rid]
        return {
            "replicas": {
                r: {"metrics": text, "stats": stats} for r, (_, text, stats) in self._replicas.items()
            },
            "decisions": dict(self._decisions),
            "desired": self._desired,
            "history": list(self._history),
        }


def actor(name: str, namespace: str, desired: int | None = None) -> Any:
    """The named ClusterStats actor, created (detached, no CPU) if it does not exist yet."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=-1)(ClusterStats)
    opts = {"name": name, "namespace": namespace, "lifetime": "detached", "get_if_exists": True}
    return cls.options(**opts).remote(desired)  # type: ignore[attr-defined]


class _ClusterCollector(Collector):
    def __init__(self, snapshot: Mapping[str, Any], routing: Mapping[str, int]):
        self._snap = snapshot
        self._routing = routing

    def collect(self) -> Iterator[Metric]:
        replicas: Mapping[str, Any] = self._snap["replicas"]
        families: dict[str, Metric] = {}
        for rid in sorted(replicas):
            for fam in text_string_to_metric_families(replicas[rid]["metrics"]):
                if fam.name.endswith("_created"):  # a counter's creation time: per process, not cluster
                    continue
                merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for s in fam.samples:
                    if not s.name.endswith("_created"):
                        merged.add_sample(s.name, {**s.labels, "replica": rid}, s.value)
        yield from families.values()
        yield GaugeMetricFamily("qserve_replicas", "Engine replicas reporting metrics.", value=len(replicas))
        if self._snap["desired"] is not None:
            desired = float(self._snap["desired"])
            yield GaugeMetricFamily(
                "qserve_desired_replicas", "The autoscaler's last decision.", value=desired
            )
        decisions = CounterMetricFamily(
            "qserve_autoscaling_decisions", "Autoscaling decisions, by direction.", labels=["direction"]
        )
        for d in DIRECTIONS:
            decisions.add_metric([d], float(self._snap["decisions"].get(d, 0)))
        yield decisions
        routed = CounterMetricFamily(
            "qserve_routing_decisions", "Requests routed, by why that replica.", labels=["reason"]
        )
        for reason, n in sorted(self._routing.items()):
            routed.add_metric([reason], float(n))
        yield routed
        stats = [r["stats"] for r in replicas.values()]
        headroom = sum(s.get("admission_headroom_sequences", 0.0) for s in stats)
        yield GaugeMetricFamily(
            "qserve_cluster_admission_headroom_sequences",
            "More average-sized requests the replicas admit now, summed.",
            value=headroom,
        )
        yield GaugeMetricFamily(
            "qserve_cluster_prefix_cache_hit_rate",
            "Prompt tokens found in a replica's prefix cache, over all replicas.",
            value=cluster_hit_rate(stats),
        )


def cluster_hit_rate(stats: list[Mapping[str, float]]) -> float:
    """The replicas' prefix-cache hit rates weighted by their prompt tokens."""
    tokens = sum(s.get("prompt_tokens_total", 0.0) for s in stats)
    hits = sum(s.get("prefix_cache_hit_rate", 0.0) * s.get("prompt_tokens_total", 0.0) for s in stats)
    return hits / tokens if tokens else 0.0


def render(snapshot: Mapping[str, Any], routing: Mapping[str, int]) -> bytes:
    """Prometheus text of a ClusterStats snapshot and the router's decision counts (module docstring)."""
    registry = CollectorRegistry()
    registry.register(_ClusterCollector(snapshot, routing))
    return generate_latest(registry)
