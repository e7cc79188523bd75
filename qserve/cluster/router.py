"""The Ray Serve request router of the engine deployment: `routing.rank_replicas` on live replica state.

Serve builds one per deployment handle, in the process that holds the handle (the ingress), and asks
``choose_replicas`` for ranks of replicas to try in order; it then sends the request to the first replica
of the first rank that accepts it and calls ``on_request_routed`` with where it went. Each engine replica's
``record_routing_stats`` (its admission headroom) reaches ``RunningReplica.routing_stats`` every
``request_routing_stats_period_s``; the router subtracts the requests it has sent that replica since
its last report and that have not finished. Serve pickles this module by value: state shared with the
ingress (the decision counts) lives in the `routing` module, imported by name.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from qserve.cluster import routing


class SessionAffinityRouter(RequestRouter):
    """Session affinity, then most headroom, or uniformly random (the baseline): each request carries its
    ingress's mode (`routing.ForwardedRequest.routing`). ``request_router_kwargs``: max_keys, seed."""

    def initialize_state(self, max_keys: int = 1 << 16, seed: int | None = None) -> None:  # type: ignore[override]
        self.table = routing.AffinityTable(max_keys)
        self.rng = random.Random(seed)
        self.seen: dict[str, tuple[dict[str, Any], int]] = {}  # replica -> (its last stats, their epoch)
        self.inflight: dict[str, tuple[str, int]] = {}  # request id -> (replica, its epoch when sent)
        self.unseen: Counter[tuple[str, int]] = Counter()  # in flight, sent after that epoch's stats

    def _epoch(self, replica: RunningReplica) -> int:
        rid, stats = replica.replica_id.unique_id, replica.routing_stats or {}
        seen = self.seen.get(rid)
        if seen is None or seen[0] != stats:
            seen = self.seen[rid] = (dict(stats), seen[1] + 1 if seen else 0)
        return seen[1]

    def _headroom(self, replica: RunningReplica) -> float:
        """The replica's reported headroom less the requests in flight there that its report cannot know."""
        stats = replica.routing_stats or {}
        if "admission_headroom_sequences" not in stats:
            return math.inf  # not reported yet: a new replica, empty
        epoch = self._epoch(replica)
        return float(stats["admission_headroom_sequences"]) - self.unseen[replica.replica_id.unique_id, epoch]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key, mode = _route_info(pending_request)
        loads = [routing.ReplicaLoad(r.replica_id.unique_id, self._headroom(r)) for r in candidate_replicas]
        ranked, _ = routing.rank_replicas(key, loads, self.table, mode=mode, rng=self.rng)
        if pending_request is not None:  # every replica ranked: if none accepts, back off before retrying
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = replica_id.unique_id
        epoch = self.seen[rid][1] if rid in self.seen else -1
        self.inflight[pending_request.metadata.internal_request_id] = (rid, epoch)
        self.unseen[rid, epoch] += 1
        key, mode = _route_info(pending_request)
        # the reason as seen now that the replica is known (a retry may land elsewhere than ranked first)
        if mode == "random":
            reason = "random"
        elif key is None:
            reason = "headroom"
        else:
            home = self.table.get(key)
            reason = "affinity" if home == rid else "new_session" if home is None else "overflow"
            self.table.set(key, rid)
        routing.DECISIONS[reason] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        sent = self.inflight.pop(internal_request_id, None)
        if sent is not None:
            self.unseen[sent] -= 1
            if self.unseen[sent] <= 0:
                del self.unseen[sent]


def _route_info(pending_request: PendingRequest | None) -> tuple[str | None, str]:
    """(session key, routing mode) of a request (an ingress's ForwardedRequest; anything else: unkeyed)."""
    req = pending_request.args[0] if pending_request is not None and pending_request.args else None
    if isinstance(req, routing.ForwardedRequest):
        return req.session_key, req.routing
    return None, "affinity"
