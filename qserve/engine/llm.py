"""The offline API (mirrors vLLM's): ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from qserve.config import EngineConfig, check_max_model_len
from qserve.engine.llm_engine import LLMEngine
from qserve.engine.structured import check_spec
from qserve.errors import QServeError
from qserve.types import RequestOutput, SamplingParams


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    ``model`` is a local Hugging Face directory (or a qserve-converted one) or ``"demo"``.
    ``kv_cache_memory`` is the KV pool size in bytes or as a size string like the CLI's (``"2GiB"``;
    None: enough for max_num_seqs full-length sequences, capped at 4 GiB on CPU). Extra keyword arguments
    go to :class:`qserve.config.EngineConfig`. Every value is checked (QServeError) before the model loads.
    ``enforce_eager=True`` runs every step eagerly (vLLM's name); by default the CPU forward is compiled with
    torch.compile at start-up.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        kv_cache_memory: int | str | None = None,
        max_num_seqs: int | None = None,
        enforce_eager: bool | None = None,
        **kwargs: Any,
    ):
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if enforce_eager is not None:  # None: EngineConfig's default (QSERVE_ENFORCE_EAGER, else compiled)
            kwargs["enforce_eager"] = enforce_eager
        config = EngineConfig(
            model=str(model),
            device=device,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_memory=kv_cache_memory,  # type: ignore[arg-type]  # a SIZE string becomes bytes
            **kwargs,
        )
        check_max_model_len(config)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: str | Seq[str] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        prompt_token_ids: Seq[Seq[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished RequestOutput per prompt, in input order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None:
            items: list[tuple[str | None, list[int] | None]] = [(None, list(t)) for t in prompt_token_ids]
        elif prompts is not None:
            items = [(p, None) for p in prompts]
        else:
            raise QServeError("generate() needs prompts or prompt_token_ids")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(items)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(items):
            raise QServeError(f"{len(items)} prompts but {len(params)} sampling params")
        for p in {id(p): p for p in params}.values():
            if p.structured_outputs is not None:
                check_spec(p.structured_outputs)  # a bad schema raises here, before anything is queued
        ids: list[str] = []
        try:
            for (prompt, toks), p in zip(items, params, strict=True):
                rid = f"gen-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, p, prompt_token_ids=toks)
                ids.append(rid)
        except QServeError:
            for rid in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in ids]

    def metrics(self) -> dict[str, Any]:
        """The metrics of DESIGN §4 as a dict, names without the ``qserve_`` prefix."""
        return self.engine.metrics()
