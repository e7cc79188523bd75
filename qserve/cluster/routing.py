"""Which engine replica serves a request: session affinity first, then the most admission headroom.

Pure functions and plain data; `qserve.cluster.router` is the Ray Serve request router around them.

A request's **session key** is its OpenAI ``user`` field when it has one, else a hash of its prompt's first
KV block (``block_size`` tokens): the tokens the engine's prefix cache keys its first block by, so requests
that share a key can share cached blocks on one replica. :func:`rank_replicas` sends a keyed request to the
replica that served its key last while that replica has room for one more sequence (``affinity``), else,
or for a new key, to the replica with the most headroom (``overflow``, ``new_session``; ties broken by a
rendezvous hash of the key, so new sessions spread evenly); an unkeyed request goes to the most headroom
(``headroom``). ``random`` is the baseline the affinity is measured against.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("affinity", "random")
REASONS = ("affinity", "new_session", "overflow", "headroom", "random")
HEAD_CHARS_PER_TOKEN = 64  # prompt text tokenized for the first block: block_size x this many characters
# routing decisions by reason, counted by the router and shown on the ingress's /metrics (same process)
DECISIONS: Counter[str] = Counter()


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress hands it to an engine replica: the raw request and its session key."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    session_key: str | None = None
    routing: str = "affinity"  # the ingress's routing mode (one of MODES)


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica as the router sees it."""

    replica_id: str
    # admission headroom (sequences) it last reported, less the requests sent to it since; inf: no report yet
    headroom: float


class AffinityTable:
    """Session key -> the replica that served it last, least recently used keys dropped past ``max_keys``."""

    def __init__(self, max_keys: int = 1 << 16):
        self.max_keys = max_keys
        self._keys: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key: str) -> str | None:
        return self._keys.get(key)

    def set(self, key: str, replica_id: str) -> None:
        self._keys[key] = replica_id
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def session_key(user: str | None, prompt_ids: Sequence[int] | None, block_size: int) -> str | None:
    """``u:<hash of user>``, else ``p:<hash of the first block of prompt ids>``, else None (no user and a
    prompt shorter than one block, which no prefix cache can share)."""
    if user:
        return "u:" + _digest(user)
    if prompt_ids is not None and len(prompt_ids) >= block_size:
        return "p:" + _digest(",".join(map(str, prompt_ids[:block_size])))
    return None


def rendezvous(key: str, replica_id: str) -> int:
    """Highest-random-weight hash: for a key, every router ranks replicas the same way."""
    return int(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).hexdigest(), 16)


def rank_replicas(
    key: str | None,
    loads: Sequence[ReplicaLoad],
    table: AffinityTable,
    *,
    mode: str = "affinity",
    rng: random.Random | None = None,
) -> tuple[list[str], str]:
    """Replica ids, most preferred first, and the reason (one of REASONS). The caller tries them in order
    and records where a keyed request went with ``table.set``."""
    rng = rng or random.Random()
    ids = [r.replica_id for r in loads]
    if not ids:
        return [], "none"
    if mode == "random":
        rng.shuffle(ids)
        return ids, "random"
    ties = {r: (-rendezvous(key, r) if key else rng.random()) for r in ids}
    ranked = sorted(loads, key=lambda r: (-r.headroom, ties[r.replica_id]))
    by_headroom = [r.replica_id for r in ranked]
    if key is None:
        return by_headroom, "headroom"
    home = table.get(key)
    headroom = {r.replica_id: r.headroom for r in loads}
    if home not in headroom:
        return by_headroom, "new_session"
    if headroom[home] >= 1 or ranked[0].headroom < 1:  # room at home, or nowhere better
        return [home] + [r for r in by_headroom if r != home], "affinity"
    return by_headroom, "overflow"


def request_session_key(path: str, body: bytes, tokenizer: Any, block_size: int) -> str | None:
    """The session key of an OpenAI request body (None when it is not a valid completion or chat body:
    the replica answers that one with its 400). Only the prompt's first ``block_size x
    HEAD_CHARS_PER_TOKEN`` characters are tokenized, enough for the first block's tokens."""
    from qserve.server.serving import chat_text

    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    user = data.get("user")
    if isinstance(user, str) and user:
        return session_key(user, None, block_size)
    head = block_size * HEAD_CHARS_PER_TOKEN
    prompt = data.get("prompt")
    ids: list[int] | None = None
    try:
        if path.endswith("/chat/completions") and isinstance(data.get("messages"), list):
            text, templated = chat_text(tokenizer, [_message(m) for m in data["messages"]])
            ids = list(tokenizer.encode(text[:head], add_special_tokens=not templated))
        elif path.endswith("/completions") and prompt:
            first = prompt[0] if isinstance(prompt, list) and not isinstance(prompt[0], int) else prompt
            if isinstance(first, str):
                ids = list(tokenizer.encode(first[:head]))
            elif isinstance(first, list) and all(isinstance(t, int) for t in first[:block_size]):
                ids = first
    except Exception:  # a template error, a malformed message: the replica reports it
        return None
    return session_key(None, ids, block_size)


def _message(m: Any) -> dict[str, str]:
    if not isinstance(m, dict):
        raise ValueError("not a message")
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return {"role": str(m.get("role", "")), "content": content if isinstance(content, str) else ""}
