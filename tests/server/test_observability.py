"""Request metrics, the access log, the stats line, --log-format json, and the tokenize/version/openapi
endpoints, on real servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import qserve
from tests.server.conftest import ServerProcess, httpx, metric, wait_for


@pytest.fixture(scope="module")
def http(server: ServerProcess, auth: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        yield c


def scrape(http: httpx.Client) -> str:
    return http.get("/metrics").text


def value(text: str, name: str) -> float:
    try:
        return metric(text, name)
    except KeyError:
        return 0.0


def test_http_requests_total_by_code_and_endpoint(http: httpx.Client) -> None:
    ok = 'qserve_http_requests_total{code="200",endpoint="/v1/completions"}'
    bad = 'qserve_http_requests_total{code="400",endpoint="/v1/completions"}'
    missing = 'qserve_http_requests_total{code="404",endpoint="other"}'
    unauthorized = 'qserve_http_requests_total{code="401",endpoint="/v1/models"}'
    before = scrape(http)
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": "2"}).status_code == 400
    assert http.get("/no/such/path").status_code == 404
    assert httpx.get(str(http.base_url) + "/v1/models").status_code == 401
    expected = {ok: 1, bad: 2, missing: 1, unauthorized: 1}

    def counted() -> bool:
        after = scrape(http)
        return all(value(after, k) - value(before, k) == n for k, n in expected.items())

    assert wait_for(counted, 5), scrape(http)


def test_latency_histograms(http: httpx.Client) -> None:
    names = ("e2e_request_latency_seconds", "request_queue_time_seconds", "time_to_first_token_seconds")
    itl = "qserve_inter_token_latency_seconds_count"
    before = scrape(http)
    body = {"prompt": "count", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    assert http.post("/v1/completions", json=body).status_code == 200

    def observed() -> bool:
        after = scrape(http)
        once = all(value(after, f"qserve_{n}_count") - value(before, f"qserve_{n}_count") == 1 for n in names)
        return once and value(after, itl) - value(before, itl) == 7  # one gap per token after the first

    assert wait_for(observed, 5), scrape(http)
    after = scrape(http)
    e2e = value(after, "qserve_e2e_request_latency_seconds_sum") - value(
        before, "qserve_e2e_request_latency_seconds_sum"
    )
    ttft = value(after, "qserve_time_to_first_token_seconds_sum") - value(
        before, "qserve_time_to_first_token_seconds_sum"
    )
    assert 0 < ttft <= e2e < 30


def test_access_log_line_per_request(server: ServerProcess, http: httpx.Client) -> None:
    body = {"prompt": "access log", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert http.get("/access/log/probe").status_code == 404

    def logged() -> bool:
        out = server.output()
        return '"GET /access/log/probe" 404' in out and "completion_tokens=5 latency=" in out

    assert wait_for(logged, 5), server.output()[-2000:]
    line = next(x for x in server.output().splitlines() if "completion_tokens=5 latency=" in x)
    assert line.startswith("INFO qserve.access: 127.0.0.1:") and '"POST /v1/completions" 200' in line
    assert "prompt_tokens=" in line


def test_tokenize_detokenize(http: httpx.Client, chat_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(chat_model))
    text = "def fib(n): return n"
    r = http.post("/tokenize", json={"model": "tiny", "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    got = r.json()
    ids = tok.encode(text)
    assert got == {
        "count": len(ids),
        "max_model_len": 512,
        "tokens": ids,
        "token_strs": tok.convert_ids_to_tokens(ids),
    }
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode(text, add_special_tokens=False) and plain["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}
    # messages count exactly what a chat completion's prompt costs
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi there"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    done = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert chat["count"] == done["usage"]["prompt_tokens"] == len(chat["tokens"])
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] == chat["count"] - len(tok.encode("<|assistant|>", add_special_tokens=False))


def test_version_and_openapi(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/version").json() == {"version": qserve.__version__}
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schema["components"]["schemas"]
        assert "422" not in paths[path]["post"]["responses"]
    for path in ("/health", "/metrics", "/version", "/v1/models"):
        assert "get" in paths[path]
    role = schema["components"]["schemas"]["ChatMessage"]["properties"]["role"]
    assert set(role["enum"]) == {"system", "developer", "user", "assistant", "tool", "function"}
    assert httpx.get(server.url + "/docs").status_code == 404  # the docs UI stays off


def test_json_logs_and_stats_line(plain_model: Path, tmp_path: Path) -> None:
    srv = ServerProcess(
        plain_model,
        tmp_path / "server.log",
        "--log-format",
        "json",
        "--disable-access-log",
        "--stats-interval",
        "0.5",
    )
    try:
        body = {"prompt": "busy", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
        for _ in range(3):
            assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200

        def records() -> list[dict[str, object]]:
            lines = [x for x in srv.output().splitlines() if x.strip()]
            return [json.loads(x) for x in lines]  # every line is one JSON object

        assert wait_for(lambda: any(r["logger"] == "qserve.stats" for r in records()), 10), srv.output()
        recs = records()
        assert all({"time", "level", "logger", "message"} <= set(r) for r in recs)
        assert not any(r["logger"] == "qserve.access" for r in recs)  # --disable-access-log
        assert any("serving" in str(r["message"]) for r in recs)  # the start-up plan, as records
        stats = [r for r in recs if r["logger"] == "qserve.stats"]
        assert any(float(r["generation_tokens_per_s"]) > 0 for r in stats)  # type: ignore[arg-type]
        for r in stats:
            assert {
                "running",
                "waiting",
                "kv_cache_usage",
                "prompt_tokens_per_s",
                "prefix_cache_hit_rate",
            } <= set(r)
            assert "KV cache usage" in str(r["message"])
    finally:
        srv.stop()
