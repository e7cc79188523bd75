"""The Ray-facing request router on stand-in replicas, and the cluster /metrics rendering (no Ray cluster)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from qserve.cluster import routing
from qserve.cluster.routing import ForwardedRequest
from qserve.cluster.stats import ClusterStats, cluster_hit_rate, render


def replica(rid: str, **stats: Any) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats=stats)


def pending(key: str | None, rid: str, mode: str = "affinity") -> Any:
    req = ForwardedRequest("POST", "/v1/completions", b"", (), b"{}", key, mode)
    return SimpleNamespace(
        args=[req], metadata=SimpleNamespace(internal_request_id=rid), routing_context=SimpleNamespace()
    )


def test_router_affinity_and_headroom_correction() -> None:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from qserve.cluster.router import SessionAffinityRouter

    router = SessionAffinityRouter(DeploymentID(name="e", app_name="a"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(seed=0)
    a, b = replica("a", admission_headroom_sequences=3), replica("b", admission_headroom_sequences=2)

    def choose(req: Any, *replicas: Any) -> list[str]:
        ranks = asyncio.run(router.choose_replicas(list(replicas), req))
        assert req.routing_context.should_backoff  # all replicas ranked: back off if none accepts
        return [rank[0].replica_id.unique_id for rank in ranks]

    before = dict(routing.DECISIONS)
    r1 = pending(None, "req-1")
    assert choose(r1, a, b) == ["a", "b"]  # most headroom
    router.on_request_routed(r1, a.replica_id, None)
    # a's report (3) does not know req-1 yet: 3 - 1 = 2, a tie with b
    r2 = pending("u:s", "req-2")
    ranked = choose(r2, a, b)
    assert set(ranked) == {"a", "b"}
    router.on_request_routed(r2, b.replica_id, None)  # the session lands on b
    router.on_request_completed(a.replica_id, "req-1")  # a is back to its reported 3
    assert choose(pending("u:s", "req-3"), a, b) == ["b", "a"]  # affinity beats a's larger headroom
    router.on_request_routed(pending("u:s", "req-3"), b.replica_id, None)
    # b reported 2 and has 2 requests in flight since: full; the session overflows to a
    assert choose(pending("u:s", "req-4"), a, b) == ["a", "b"]
    # a fresh report from b (headroom 3): the requests sent before it are in it
    b.routing_stats = {"admission_headroom_sequences": 3}
    assert choose(pending("u:s", "req-5"), a, b) == ["b", "a"]
    # a replica with no report yet is the emptiest
    assert choose(pending(None, "req-6"), a, b, replica("c"))[0] == "c"
    counted = {k: routing.DECISIONS[k] - before.get(k, 0) for k in routing.DECISIONS}
    assert counted == {"headroom": 1, "new_session": 1, "affinity": 1}
    assert choose(pending("u:s", "req-7", mode="random"), a, b) in (["a", "b"], ["b", "a"])


def metrics_text(running: int, headroom: int) -> str:
    return (
        "# HELP qserve_requests_running Sequences in the running batch.\n"
        "# TYPE qserve_requests_running gauge\n"
        f"qserve_requests_running {running}\n"
        "# HELP qserve_admission_headroom_sequences How many more average-sized requests fit now.\n"
        "# TYPE qserve_admission_headroom_sequences gauge\n"
        f"qserve_admission_headroom_sequences {headroom}\n"
        "# HELP qserve_requests_finished Requests finished, by reason (stop, length, abort).\n"
        "# TYPE qserve_requests_finished counter\n"
        'qserve_requests_finished_total{reason="stop"} 3.0\n'
        "# HELP qserve_requests_finished_created Requests finished, by reason (stop, length, abort).\n"
        "# TYPE qserve_requests_finished_created gauge\n"
        'qserve_requests_finished_created{reason="stop"} 1.7e+09\n'
    )


def test_cluster_metrics() -> None:
    s = ClusterStats(desired=1)
    s.report_replica("r1", metrics_text(2, 5), {"admission_headroom_sequences": 5.0, "prompt_tokens_total": 300,
                                                "prefix_cache_hit_rate": 0.5})  # fmt: skip
    s.report_replica("r2", metrics_text(0, 8), {"admission_headroom_sequences": 8.0, "prompt_tokens_total": 100,
                                                "prefix_cache_hit_rate": 0.1})  # fmt: skip
    s.record_decision({"time": 0.0, "from": 1, "to": 2, "direction": "up", "reason": "queue"})
    s.report_replica("r3", metrics_text(0, 0), {})
    s.remove_replica("r3")
    snap = s.snapshot()
    assert snap["desired"] == 2 and snap["decisions"] == {"up": 1} and len(snap["history"]) == 1
    text = render(snap, {"affinity": 7, "new_session": 2}).decode()
    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for fam in text_string_to_metric_families(text)
        for x in fam.samples
    }
    assert samples[("qserve_requests_running", (("replica", "r1"),))] == 2
    assert samples[("qserve_requests_running", (("replica", "r2"),))] == 0
    assert samples[("qserve_requests_finished_total", (("reason", "stop"), ("replica", "r2")))] == 3
    assert samples[("qserve_replicas", ())] == 2
    assert samples[("qserve_desired_replicas", ())] == 2
    assert samples[("qserve_autoscaling_decisions_total", (("direction", "up"),))] == 1
    assert samples[("qserve_autoscaling_decisions_total", (("direction", "down"),))] == 0
    assert samples[("qserve_routing_decisions_total", (("reason", "affinity"),))] == 7
    assert samples[("qserve_cluster_admission_headroom_sequences", ())] == 13
    # (0.5 x 300 + 0.1 x 100) / 400 prompt tokens
    assert samples[("qserve_cluster_prefix_cache_hit_rate", ())] == (150 + 10) / 400
    assert text.count("# TYPE qserve_requests_running gauge") == 1  # one family across replicas
    assert "_created" not in text  # per-process creation times do not merge
    assert cluster_hit_rate([]) == 0.0
