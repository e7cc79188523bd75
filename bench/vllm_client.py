"""vLLM's own serving benchmark client (`vllm.benchmarks.serve`) with the two patches the peer scripts prescribe.

Run it with vLLM's interpreter (``../shared/peers/vllm-cpu.sh`` builds it), against any OpenAI-compatible server:

    ~/.cache/vllm-cpu/bin/python bench/vllm_client.py --backend openai --base-url http://127.0.0.1:8031 \\
        --endpoint /v1/completions --model demo --tokenizer qserve/demo/model --dataset-name random \\
        --random-input-len 128 --random-output-len 128 --num-prompts 16 --max-concurrency 1 --ignore-eos --seed 1

* ``importlib.metadata`` is asked for "vllm" but the package is vllm-cpu: answered with its version.
* llama-server closes the socket after every streamed response although it advertises keep-alive, so every
  server is given a fresh connection per request (aiohttp ``force_close=True``), the same for all peers.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
from typing import Any

_version = md.version
md.version = lambda name: "0.32.0" if name == "vllm" else _version(name)  # type: ignore[assignment]

import aiohttp  # noqa: E402

_connector_init = aiohttp.TCPConnector.__init__


def _fresh_connections(self: aiohttp.TCPConnector, *args: Any, **kwargs: Any) -> None:
    kwargs["force_close"] = True
    kwargs.pop("keepalive_timeout", None)  # aiohttp refuses it together with force_close
    _connector_init(self, *args, **kwargs)


aiohttp.TCPConnector.__init__ = _fresh_connections  # type: ignore[method-assign]

from vllm.benchmarks import serve  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    serve.add_cli_args(parser)
    serve.main(parser.parse_args())
