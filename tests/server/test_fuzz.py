"""schemathesis over the server's own /openapi.json: generated bodies (valid and invalid) for every
operation, a bounded number per operation; no answer may be a 5xx, and the server serves afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.server.conftest import ServerProcess, httpx, metric

pytestmark = pytest.mark.slow
EXAMPLES = 40  # per operation: ~1 minute in all on the 2-core CI machine


@pytest.fixture(scope="module")
def fuzz_server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "fuzz-server.log"
    srv = ServerProcess(chat_model, log, "--served-model-name", "tiny", "--disable-access-log")
    yield srv
    srv.stop()


def check(case: schemathesis.Case, url: str) -> None:
    response = case.call(base_url=url, timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, response.text


def test_no_server_errors(fuzz_server: ServerProcess) -> None:
    """Each operation in turn (schemathesis' own pytest plugin does not run under this pytest), with
    positive and negative generation: the negative cases are what a 400 must answer."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    labels = []
    for result in schema.get_all_operations():
        op = result.ok()
        labels.append(op.label)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=op.as_strategy(generation_mode=GenerationMode.POSITIVE)
            | op.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        )
        def run(case: schemathesis.Case) -> None:
            check(case, fuzz_server.url)

        run()
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"} <= set(
        labels
    )


def test_still_serving_after_fuzzing(fuzz_server: ServerProcess) -> None:
    """Runs after the fuzz cases (file order): nothing they sent left the server unhealthy."""
    assert httpx.get(fuzz_server.url + "/health", timeout=10).status_code == 200
    body = {"prompt": "still here", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = httpx.post(fuzz_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    text = httpx.get(fuzz_server.url + "/metrics", timeout=10).text
    assert 'code="500"' not in text  # no 5xx anywhere, streams included (their status is sent first)
    # the fuzzer really reached each operation, with bodies refused (400) and, for generation, accepted
    # ones (the tokenize pair mostly draws a random 'model', answered 404)
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        codes = ("200", "400") if path.startswith("/v1/") else ("400",)
        for code in codes:
            assert metric(text, f'qserve_http_requests_total{{code="{code}",endpoint="{path}"}}') > 0, (
                path,
                code,
            )
    assert fuzz_server.proc.poll() is None
