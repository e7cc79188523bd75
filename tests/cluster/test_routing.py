"""Session keys and the replica choice (affinity, overflow, new sessions, headroom, random), no Ray needed."""

from __future__ import annotations

import json
import random

import pytest

from qserve.cluster.routing import (
    AffinityTable,
    ReplicaLoad,
    rank_replicas,
    rendezvous,
    request_session_key,
    session_key,
)
from qserve.config import resolve_model_path
from qserve.server.serving import render_chat
from qserve.tokenizer import load_tokenizer

BS = 16


def loads(**headroom: float) -> list[ReplicaLoad]:
    return [ReplicaLoad(rid, h) for rid, h in headroom.items()]


def test_session_key() -> None:
    ids = list(range(40))
    assert session_key("alice", ids, BS) == session_key("alice", None, BS) != session_key("bob", None, BS)
    assert session_key("alice", None, BS).startswith("u:")  # type: ignore[union-attr]
    # the prompt's first block decides: same first 16 ids, same key; a change inside it, another key
    assert session_key(None, ids, BS) == session_key(None, ids[:16] + [99, 98], BS)
    assert session_key(None, ids, BS) != session_key(None, [1] + ids[1:], BS)
    assert session_key(None, ids[:15], BS) is None  # no full block: nothing a prefix cache can share
    assert session_key("", None, BS) is None


def test_affinity_table_is_lru_bounded() -> None:
    t = AffinityTable(max_keys=2)
    t.set("a", "r1")
    t.set("b", "r2")
    t.set("a", "r3")  # refreshes a
    t.set("c", "r1")  # evicts b, the least recently set
    assert (t.get("a"), t.get("b"), t.get("c"), len(t)) == ("r3", None, "r1", 2)


def test_rank_affinity_overflow_and_new_sessions() -> None:
    t = AffinityTable()
    t.set("u:a", "r2")
    # the session's replica while it has room, even with less headroom than another
    assert rank_replicas("u:a", loads(r1=6, r2=1, r3=3), t) == (["r2", "r1", "r3"], "affinity")
    # full at home, room elsewhere: the most headroom
    assert rank_replicas("u:a", loads(r1=6, r2=0.5, r3=3), t) == (["r1", "r3", "r2"], "overflow")
    # full everywhere: stay home (its cache is still the best bet)
    assert rank_replicas("u:a", loads(r1=0, r2=0, r3=0.5), t) == (["r2", "r3", "r1"], "affinity")
    # home gone (scaled down): a new session for the router, most headroom first
    assert rank_replicas("u:a", loads(r1=2, r3=5), t) == (["r3", "r1"], "new_session")
    # a new key with equal headroom everywhere: the rendezvous hash orders the replicas
    ranked, reason = rank_replicas("u:c", loads(r1=4, r2=4), t)
    assert reason == "new_session"
    assert ranked == sorted(["r1", "r2"], key=lambda r: -rendezvous("u:c", r)) == ["r2", "r1"]
    assert rank_replicas("u:a", [], t) == ([], "none")


def test_rank_without_key_and_random() -> None:
    t = AffinityTable()
    assert rank_replicas(None, loads(r1=1, r2=7, r3=float("inf")), t) == (["r3", "r2", "r1"], "headroom")
    ranked, reason = rank_replicas("u:a", loads(r1=1, r2=7, r3=3), t, mode="random", rng=random.Random(0))
    expected = ["r1", "r2", "r3"]
    random.Random(0).shuffle(expected)
    assert (ranked, reason) == (expected, "random")


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer(resolve_model_path("demo"))


def test_request_session_key(tok) -> None:  # type: ignore[no-untyped-def]
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3
    ids = list(tok.encode(text))
    assert len(ids) > BS

    def key(path: str, body: object) -> str | None:
        return request_session_key(path, json.dumps(body).encode(), tok, BS)

    assert key("/v1/completions", {"prompt": text}) == session_key(None, ids, BS)
    assert key("/v1/completions", {"prompt": [text, "other"]}) == session_key(None, ids, BS)
    assert key("/v1/completions", {"prompt": ids}) == session_key(None, ids, BS)
    assert key("/v1/completions", {"prompt": [ids, [1, 2]]}) == session_key(None, ids, BS)
    assert key("/v1/completions", {"prompt": text, "user": "alice"}) == session_key("alice", None, BS)
    assert key("/v1/completions", {"prompt": "short"}) is None
    messages = [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]
    chat_ids = render_chat(tok, messages)
    assert key("/v1/chat/completions", {"messages": messages}) == session_key(None, chat_ids, BS)
    parts = [{"role": "system", "content": [{"type": "text", "text": text}]}, messages[1]]
    assert key("/v1/chat/completions", {"messages": parts}) == session_key(None, chat_ids, BS)
    # not a valid body: no key (the replica answers it with a 400)
    assert request_session_key("/v1/completions", b"{nope", tok, BS) is None
    assert key("/v1/completions", [1, 2]) is None
    assert key("/v1/chat/completions", {"messages": ["x"]}) is None
