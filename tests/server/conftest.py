"""Real `qserve serve` processes on 127.0.0.1 for the server tests (started once per session/module)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model

try:  # the HTTP client the installed `openai` is built on (recent releases: httpx2, older: httpx)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

API_KEY = "sk-qserve-test"
# A template unlike the plain fallback ("role: content\n" ... "assistant:"), so tests can tell them apart.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m qserve.cli serve MODEL --port P ...` as a subprocess, its output in a log file."""

    def __init__(self, model: Path, log: Path, *args: str, new_session: bool = False):
        """``new_session``: the server leads a process group of its own (its engine process in it), as
        under systemd or `timeout`, so a test can signal the whole group."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "qserve.cli", "serve", str(model), "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=new_session
            )
        self._wait_ready()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def engine_pid(self) -> int:
        """The engine process: the server's multiprocessing-spawned child."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                return int(pid)
        raise RuntimeError(f"no engine process among {children}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def write_model(out: Path, chat_template: str | None) -> Path:
    make_tiny_model(out, "llama")
    if chat_template is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        tok.chat_template = chat_template
        tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny byte-level Llama, its tokenizer given a chat template."""
    return write_model(tmp_path_factory.mktemp("chat-llama"), CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny byte-level Llama without a chat template (the server's plain transcript fallback)."""
    return write_model(tmp_path_factory.mktemp("plain-llama"), None)


@pytest.fixture(scope="session")
def server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server: template model, an API key, default queue and batch sizes."""
    log = tmp_path_factory.mktemp("logs") / "main-server.log"
    srv = ServerProcess(chat_model, log, "--api-key", API_KEY, "--served-model-name", "tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with labels, e.g. 'qserve_x{reason="abort"}') in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()
