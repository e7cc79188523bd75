"""qserve: quantization-aware, memory-efficient LLM serving."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from qserve.engine.llm import LLM
    from qserve.types import RequestOutput, SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    # Lazy: `import qserve` (e.g. for `qserve --help`) must not pay for importing torch.
    if name == "LLM":
        from qserve.engine.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams", "RequestOutput"):
        from qserve import types

        return getattr(types, name)
    raise AttributeError(name)
