"""Bad input: each case answered with the right 4xx in OpenAI's error format, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.server.conftest import ServerProcess, httpx

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

# (name, path, body: dict -> JSON, bytes -> raw, expected status)
CASES: list[tuple[str, str, Any, int]] = [
    ("malformed json", COMPLETIONS, b'{"prompt": "hi",', 400),
    ("not an object", COMPLETIONS, b"[1, 2]", 400),
    ("empty body", COMPLETIONS, b"", 400),
    ("invalid utf-8", COMPLETIONS, b'{"prompt": "\xff\xfe"}', 400),
    ("prompt missing", COMPLETIONS, {"model": "tiny"}, 400),
    ("prompt wrong type", COMPLETIONS, {"prompt": 5}, 400),
    ("max_tokens as string", COMPLETIONS, {**OK, "max_tokens": "8"}, 400),
    ("max_tokens float", COMPLETIONS, {**OK, "max_tokens": 1.5}, 400),
    ("stream not bool", COMPLETIONS, {**OK, "stream": "yes"}, 400),
    ("negative max_tokens", COMPLETIONS, {**OK, "max_tokens": -1}, 400),
    ("huge max_tokens", COMPLETIONS, {**OK, "max_tokens": 10**9}, 400),
    ("giant max_tokens", COMPLETIONS, {**OK, "max_tokens": 10**40}, 400),
    ("empty prompt", COMPLETIONS, {**OK, "prompt": ""}, 400),
    ("empty prompt list", COMPLETIONS, {**OK, "prompt": []}, 400),
    ("empty token list", COMPLETIONS, {**OK, "prompt": [[]]}, 400),
    ("token id out of range", COMPLETIONS, {**OK, "prompt": [1, 2, 99999]}, 400),
    ("negative token id", COMPLETIONS, {**OK, "prompt": [-1]}, 400),
    ("prompt too long", COMPLETIONS, {**OK, "prompt": "x" * 600}, 400),
    ("prompt + max_tokens too long", COMPLETIONS, {**OK, "prompt": "x" * 500, "max_tokens": 20}, 400),
    ("temperature negative", COMPLETIONS, {**OK, "temperature": -1}, 400),
    ("temperature NaN", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400),
    ("top_p zero", COMPLETIONS, {**OK, "top_p": 0}, 400),
    ("n zero", COMPLETIONS, {**OK, "n": 0}, 400),
    ("n huge", COMPLETIONS, {**OK, "n": 10**6}, 400),
    ("logprobs too many", COMPLETIONS, {**OK, "logprobs": 50}, 400),
    ("seed too big", COMPLETIONS, {**OK, "seed": 2**70}, 400),
    ("stop wrong type", COMPLETIONS, {**OK, "stop": 3}, 400),
    ("unknown model", COMPLETIONS, {**OK, "model": "gpt-9"}, 404),
    ("chat messages missing", CHAT, {"model": "tiny"}, 400),
    ("chat messages wrong type", CHAT, {"messages": "hi"}, 400),
    ("chat messages empty", CHAT, {"messages": []}, 400),
    ("chat image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("chat unknown model", CHAT, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("chat too long", CHAT, {"messages": [{"role": "user", "content": "x" * 600}]}, 400),
    ("chat unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("chat role not a string", CHAT, {"messages": [{"role": 1, "content": "x"}]}, 400),
    ("tokenize neither", "/tokenize", {"model": "tiny"}, 400),
    ("tokenize both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
    ("tokenize unknown model", "/tokenize", {"model": "nope", "prompt": "a"}, 404),
    ("tokenize unknown role", "/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, 400),
    ("detokenize missing", "/detokenize", {}, 400),
    ("detokenize out of range", "/detokenize", {"tokens": [1, 99999]}, 400),
    ("detokenize negative", "/detokenize", {"tokens": [-1]}, 400),
    ("detokenize not ints", "/detokenize", {"tokens": ["a"]}, 400),
]


def check_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]


@pytest.fixture(scope="module")
def http(server: ServerProcess, auth: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=auth, timeout=60)


@pytest.mark.parametrize("name,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input(http: httpx.Client, name: str, path: str, body: Any, status: int) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    check_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), status)


def test_messages_name_the_problem(http: httpx.Client) -> None:
    err = http.post(COMPLETIONS, json={**OK, "max_tokens": "8"}).json()["error"]
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    err = http.post(COMPLETIONS, json={**OK, "prompt": "x" * 600}).json()["error"]
    assert "maximum context length is 512 tokens" in err["message"]
    err = http.post(COMPLETIONS, json={**OK, "model": "gpt-9"}).json()["error"]
    assert err["code"] == "model_not_found"
    # a value out of range names its field too, as OpenAI's API does
    for field, value in (("temperature", -3), ("top_p", 0), ("presence_penalty", 5), ("min_p", 2)):
        err = http.post(COMPLETIONS, json={**OK, field: value}).json()["error"]
        assert err["param"] == field and field in err["message"], err


def test_oversize_body_413(http: httpx.Client) -> None:
    big = json.dumps({"prompt": "x" * (5 << 20)}).encode()
    check_error(http.post(COMPLETIONS, content=big), 413)

    def chunks() -> Any:  # no Content-Length: counted while reading
        for _ in range(6):
            yield b" " * (1 << 20)

    check_error(http.post(COMPLETIONS, content=chunks()), 413)


def test_api_key(server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sk-qserve-test"}):
        with httpx.Client(base_url=server.url, headers=headers) as c:
            for path, body in ((COMPLETIONS, OK), (CHAT, {"messages": []})):
                r = c.post(path, json=body)
                check_error(r, 401)
                assert r.json()["error"]["code"] == "invalid_api_key"
            check_error(c.get("/v1/models"), 401)
            assert c.get("/health").status_code == 200  # health and metrics stay open
            assert c.get("/metrics").status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    check_error(http.get("/v1/nope"), 404)
    check_error(http.get(COMPLETIONS), 405)


def test_still_serving_after_bad_input(http: httpx.Client) -> None:
    r = http.post(COMPLETIONS, json=OK)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert http.get("/health").json() == {"status": "ok"}
