"""A real `qserve serve` on the tiny Llama for the bench tests (one per session), context limit 512."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.conftest import ServerProcess, write_model

MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def bench_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = write_model(tmp_path_factory.mktemp("bench-llama"), None)
    log = tmp_path_factory.mktemp("logs") / "bench-server.log"
    srv = ServerProcess(model, log, "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN))
    yield srv
    srv.stop()
