"""The compiled forward: torch.compile (inductor) of the model over padded step shapes, warmed up at start.

One graph with symbolic sizes serves every padded shape of two or more rows (decode-only and mixed steps
alike: the paged attention is one custom op that reads the batch from tensors); torch specializes size 1,
so batch-1 decode gets its own graph. Inductor's caches live in ``TORCHINDUCTOR_CACHE_DIR`` (default
``~/.cache/qserve/inductor``), so a restart re-traces but does not re-generate or re-build the kernels.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.fx.experimental import _config as fx_config

from qserve.engine.step_buffers import StepBuffers, StepShape
from qserve.kernels.attention import KVLayout
from qserve.kernels.cpu_ops import step_plans

logger = logging.getLogger("qserve")
CACHE_DIR = Path.home() / ".cache" / "qserve" / "inductor"


def use_cache_dir() -> str:
    """Point inductor's on-disk caches at qserve's (unless the user chose one) and return the directory."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))


def mark_weights_static(model: torch.nn.Module) -> None:
    """Mark every tensor a module holds as a plain attribute (packed and quantized weights, which are not
    nn.Parameters) static-shaped.

    With ``dynamic=True`` dynamo gives every dimension of a non-parameter input a symbol: each step then
    reads and guards ~4 sizes per packed weight (0.3-0.5 ms of a 2 ms batch-1 step on the demo model), for
    sizes that never change.
    """
    for module in model.modules():
        for value in vars(module).values():
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static(t)


class CompiledForward:
    """torch.compile of ``model`` for steps of up to ``max_tokens`` rows, padded to the buffers' buckets.

    Args:
        model: the CausalLM; called as ``model(input_ids, positions, meta, kv_caches)``.
        max_tokens: the largest padded token count run compiled; larger steps run eager.
    """

    def __init__(self, model: torch.nn.Module, max_tokens: int):
        use_cache_dir()
        # every engine in a process compiles the same forward code again (its own weights and buffers):
        # dynamo's per-code cache limit (8) would otherwise stop the fifth LLM() of a process
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.max_tokens = max_tokens
        mark_weights_static(model)
        # decode-only steps run their attention as plain torch ops inside the graph (kernels.attention_graph);
        # QSERVE_DECODE_GRAPH=0 keeps them on the custom op (for A/B measurements)
        self.decode_graph = os.environ.get("QSERVE_DECODE_GRAPH", "1") != "0"
        # emulate_precision_casts: round where the model casts to bf16/fp16, as eager does (inductor would
        # keep fp32 there), so int8/int4 KV quantizes to the same codes compiled and eager
        self.forward: Callable[..., torch.Tensor] = torch.compile(
            model, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
        )
        self.warmup_seconds = 0.0

    def shape_for(self, buffers: StepBuffers, tokens: int, seqs: int) -> StepShape | None:
        """The padded shape a step runs at, or None (eager, exact size) above ``max_tokens``."""
        shape = buffers.padded_shape(tokens, seqs)
        return shape if shape is not None and shape.tokens <= self.max_tokens else None

    def warm_up(
        self,
        buffers: StepBuffers,
        kv_caches: list[torch.Tensor],
        layout: KVLayout,
        progress: Callable[[str], None] = logger.info,
        threads: int | None = None,
    ) -> float:
        """Compile every graph shape before the first request: batch-1 decode, the symbolic-size decode graph
        (`decode_graph`), and the symbolic-size graph of every other step.

        ``threads``: compile them for that many torch threads (None: the current setting). Inductor bakes the
        thread count into its code and dynamo guards on it, so a step run at another count compiles again:
        warm up at every count the engine runs steps at.

        The warm-up batches are all padding: nothing is attended, and no KV is written except, in the decode
        graphs, the last slot of the cache (padding rows repeat row 0's slot, -1 here), which holds nothing
        yet. Distinct sizes for token rows, sequences and table widths keep torch from assuming they are
        equal (it would then guard on the equality and recompile at serving time).
        """
        # (shape, decode graph): the decode graphs only at shapes a decode-only step can take (tokens == seqs)
        shapes = [(StepShape(1, 1), self.decode_graph)]
        decode_seqs = [b for b in buffers.buckets if 2 <= b <= buffers.max_seqs]
        if self.decode_graph and decode_seqs:
            shapes.append((StepShape(decode_seqs[-1], decode_seqs[-1]), True))
        if buffers.max_tokens >= 4 and len(buffers.buckets) > 2:
            # the largest shape: inductor sizes its loops (and whether to parallelize them) by these hints
            seqs = max(min(buffers.max_seqs, buffers.max_tokens - 1), 2)
            shapes.append((StepShape(buffers.max_tokens, seqs), False))
        for cache in kv_caches:
            torch._dynamo.mark_static(cache)
        t0 = time.perf_counter()
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            # No duck sizing while tracing: it would make sizes that merely coincide at warm-up one symbol (a
            # step's query_start_loc, S + 1, and the block tables' buffer, max_seqs + 1) and guard on their
            # equality, so the first step where they differ compiled again while serving.
            with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]  # set by install_config_module
                self._compile_shapes(shapes, buffers, kv_caches, layout, progress)
        finally:
            torch.set_num_threads(before)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def _compile_shapes(
        self,
        shapes: list[tuple[StepShape, bool]],
        buffers: StepBuffers,
        kv_caches: list[torch.Tensor],
        layout: KVLayout,
        progress: Callable[[str], None],
    ) -> None:
        for i, (shape, decode) in enumerate(shapes, 1):
            progress(f"compiling the forward: graph {i}/{len(shapes)} ({shape.tokens} rows)")
            view = buffers.fill_padding(shape)
            meta = view.metadata(layout)
            if decode:
                width = 3 if buffers.max_blocks >= 3 and shape.seqs != 3 else buffers.max_blocks
                meta.block_tables, meta.decode_graph = meta.block_tables[:, :width], True
            with torch.inference_mode(), step_plans():
                self.forward(view.input_ids, view.positions, meta, kv_caches)
