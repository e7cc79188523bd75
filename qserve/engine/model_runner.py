"""Builds the packed batch for a SchedulerOutput in the persistent buffers, runs the model, and samples."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qserve.cache.kv_cache_manager import KVCacheManager
from qserve.engine.compiled import CompiledForward
from qserve.engine.cuda_graphs import CudaGraphRunner
from qserve.engine.device_tokens import PLACEHOLDER, HostTokens, decode_sources, scatter_tokens
from qserve.engine.logits_processors import prepare_logits
from qserve.engine.sampler import sample_tensor, token_logprob
from qserve.engine.scheduler import SchedulerOutput
from qserve.engine.step_buffers import StepBuffers, StepShape
from qserve.kernels.attention import KVLayout
from qserve.kernels.attention_graph import decode_table_width
from qserve.kernels.cpu_ops import step_plans
from qserve.layers.attention import AttentionMetadata
from qserve.models.registry import CausalLM
from qserve.types import TokenLogprob


@dataclass
class ModelRunnerOutput:
    """Per sequence id: the sampled token (only sequences that reached their end this step) and logprobs.

    ``sampled`` (and on CUDA the device timings) are filled by :meth:`resolve`, which waits for the host
    copy of the step's tokens: the engine calls it when it applies the step, not the runner."""

    sampled: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> time: prepare, forward, sample
    forward_start: float = 0.0  # monotonic seconds around the forward (host view)
    forward_end: float = 0.0  # CUDA: when the host saw the step's tokens arrive (forward and sampling done)
    device_seconds: float = 0.0  # the forward's device time: CUDA events on GPU, its wall time on CPU
    pending_ids: list[int] = field(default_factory=list)  # sequence of each row of ``host_tokens``
    host_tokens: HostTokens | None = None
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # CUDA: around the forward

    _resolved: bool = field(default=False, repr=False)

    def resolve(self) -> ModelRunnerOutput:
        """Wait for the host copy of the sampled ids and fill ``sampled`` (on CUDA also the forward's device
        time, and ``forward_end`` = when the host saw the step done); idempotent."""
        if self._resolved:
            return self
        self._resolved = True
        t0 = time.perf_counter()
        if self.host_tokens is not None:
            self.sampled = dict(zip(self.pending_ids, self.host_tokens.tolist(), strict=True))
            self.host_tokens = None
        if self.events is not None:  # the copy follows the forward: after it, both events are done
            self.events[1].synchronize()
            self.forward_end = time.monotonic()
            self.device_seconds = self.events[0].elapsed_time(self.events[1]) / 1e3
            self.seconds["forward"] = self.seconds.get("forward", 0.0) + time.perf_counter() - t0
        return self


@dataclass
class _Batch:
    """One step's packed batch: the model's inputs, plus the host values sampling needs."""

    ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: list[int]  # packed row whose logits are sampled, per sampling sequence
    query_start_loc: list[int]  # host copy, B + 1
    compiled: bool  # padded to a bucket, for the compiled forward (else exact sizes, eager)
    graph: int | None = None  # CUDA: the captured decode bucket this step replays
    # device tokens: the last step's sampled ids and, per leading decode row, its row there (or -1)
    scatter: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def path(self) -> str:
        """How the step runs: "cuda_graph", "decode_graph" (compiled, attention fused), "compiled", "eager"."""
        if self.graph is not None:
            return "cuda_graph"
        if self.compiled:
            return "decode_graph" if self.meta.decode_graph else "compiled"
        return "eager"


@dataclass
class PreparedStep:
    """A step whose buffers are filled, ready to run."""

    batch: _Batch
    seconds: float  # host time the preparation took


class ModelRunner:
    """Runs one SchedulerOutput: fills the step buffers, calls the (compiled or eager) forward, samples.

    Args:
        model, kv_caches, kv, kv_layout, device: the loaded model and its paged cache.
        max_tokens, max_seqs, max_blocks: the step buffers' sizes (token budget, max_num_seqs, blocks per
            sequence at max_model_len).
        compiled: the compiled forward (None: eager, as with ``enforce_eager``).
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        kv: KVCacheManager,
        kv_layout: KVLayout,
        device: torch.device,
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        compiled: CompiledForward | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.kv = kv
        self.kv_layout = kv_layout
        self.block_size = kv.block_size
        self.device = device
        self.buffers = StepBuffers(max_tokens, max_seqs, max_blocks, device)
        self.compiled = compiled
        self.graphs: CudaGraphRunner | None = None  # CUDA: decode steps replay captured graphs
        # CPU: torch threads for a step of N tokens (None: leave torch's setting alone). A server sharing the
        # cores with its HTTP process gives decode steps one core fewer but big prefills every core.
        self.threads_for: Callable[[int], int] | None = None
        self.steps_by_path: Counter[str] = Counter()  # `_Batch.path` -> steps run that way
        # decode input tokens scattered on the device from the last step's sampled ids (device_tokens);
        # on by default on CUDA, where it saves the host round trip; CPU keeps the host path unless asked
        self.device_tokens = device.type == "cuda"
        self._last: tuple[torch.Tensor, dict[int, int]] | None = None  # last step's tokens, seq id -> row
        self.device_token_rows = 0  # input rows whose token the device wrote, since start

    def _prepare(self, so: SchedulerOutput) -> _Batch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        num_decodes = 0
        for s in so.scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            table = self.kv.get_block_table(seq.seq_id)
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            qsl.append(qsl[-1] + n)
            tables.append(table)
            num_decodes += n == 1 and num_decodes == len(seq_lens) - 1
            if s.samples:
                logits_rows.append(qsl[-1] - 1)
        sources = self._token_sources(so, num_decodes, input_ids)
        shape = (
            self.compiled.shape_for(self.buffers, len(input_ids), len(seq_lens)) if self.compiled else None
        )
        graph = None
        if self.graphs is not None:
            graph = self.graphs.bucket_for(len(input_ids), len(seq_lens), num_decodes)
            shape = StepShape(graph, graph) if graph is not None else None
        view = self.buffers.fill(
            input_ids, positions, slots, seq_lens, qsl, tables,
            shape or StepShape(len(input_ids), len(seq_lens)),
        )  # fmt: skip
        meta = view.metadata(self.kv_layout)
        if self.device.type == "cuda":  # launch sizes of the Triton kernels (eager, unpadded)
            meta.num_decodes = num_decodes
            meta.max_decode_seq_len = max(seq_lens[:num_decodes], default=1)
        compiled = shape is not None and graph is None
        if (
            compiled
            and self.compiled is not None
            and self.compiled.decode_graph
            and num_decodes == len(seq_lens)
            and shape is not None
            and shape.tokens == shape.seqs
        ):
            width = decode_table_width(max(seq_lens), bs, self.buffers.max_blocks)
            meta.block_tables, meta.decode_graph = meta.block_tables[:, :width], True
        scatter = None
        if sources is not None and self._last is not None:
            scatter = self._last[0], self.buffers.token_sources(sources)
        return _Batch(view.input_ids, view.positions, meta, logits_rows, qsl, compiled, graph, scatter)

    def _token_sources(self, so: SchedulerOutput, num_decodes: int, input_ids: list[int]) -> list[int] | None:
        """Device tokens: the leading decode rows whose input token the last step sampled get a
        placeholder in ``input_ids`` and that step's row as their source (-1: the host's token)."""
        last = self._last
        if not self.device_tokens or last is None or not num_decodes:
            return None
        decodes = so.scheduled[:num_decodes]
        ids = [s.seq.seq_id if s.start == s.seq.num_tokens - 1 else -1 for s in decodes]
        rows = decode_sources(ids, last[1])
        if all(r < 0 for r in rows):
            return None
        for i, r in enumerate(rows):
            if r >= 0:
                input_ids[i] = PLACEHOLDER  # never read: the device writes the token
                self.device_token_rows += 1
        return rows

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Prepare and run one step here (the synchronous engine)."""
        return self.run(so, self.prepare(so))

    def prepare(self, so: SchedulerOutput) -> PreparedStep:
        """Fill the step buffers. Reads the KV manager and the sequences, so it runs on the engine's thread
        (under async scheduling, before the step is handed to the step thread)."""
        t0 = time.perf_counter()
        batch = self._prepare(so)
        return PreparedStep(batch, time.perf_counter() - t0)

    @torch.inference_mode()
    def run(self, so: SchedulerOutput, prepared: PreparedStep) -> ModelRunnerOutput:
        """Run the forward and sample; touches only the step's tensors, its sequences' sampling state and
        token ids (which the engine leaves alone until the step's result is applied)."""
        out = ModelRunnerOutput()
        if (
            self.threads_for is not None
            and (n := self.threads_for(so.num_batched_tokens)) != torch.get_num_threads()
        ):
            torch.set_num_threads(n)
        batch = prepared.batch
        self.steps_by_path[batch.path] += 1
        t1, start = time.perf_counter(), time.monotonic()
        forward = self.compiled.forward if self.compiled is not None and batch.compiled else self.model
        if batch.scatter is not None:  # decode tokens from the last step's sampled ids, on the device
            scatter_tokens(self.buffers.device_bufs["input_ids"], *batch.scatter)
        events = None
        if self.device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        if batch.graph is not None and self.graphs is not None:
            hidden = self.graphs.replay(batch.graph)  # (B, H), the padded decode bucket
        else:
            with step_plans():
                hidden = forward(batch.ids, batch.positions, batch.meta, self.kv_caches)  # (T, H)
        sampling = [s.seq for s in so.scheduled if s.samples]
        logits = None
        if sampling:
            rows = batch.logits_rows
            picked = (
                hidden[: len(rows)] if rows[-1] == len(rows) - 1 else hidden[self.buffers.rows_index(rows)]
            )
            logits = self.model.compute_logits(picked)  # (S, V); decode-only: the first S rows, no index
        if events is not None:
            events[1].record()  # read in ModelRunnerOutput.resolve: no host sync here
        t2 = time.perf_counter()
        out.forward_start, out.forward_end = start, start + (t2 - t1)
        out.device_seconds, out.events = t2 - t1, events  # CPU: the forward's wall time
        self._last = None
        if logits is not None:
            procs = prepare_logits(sampling, logits.shape[-1], logits.device)
            params, gens = [q.params for q in sampling], [q.generator for q in sampling]
            tokens, lps = sample_tensor(logits, params, gens, procs)  # (S,) on the device
            out.pending_ids = [q.seq_id for q in sampling]
            out.host_tokens = HostTokens(tokens)  # CUDA: copied on a side stream, read by resolve
            self._last = tokens, {q.seq_id: i for i, q in enumerate(sampling)}
            for seq, lp in zip(sampling, lps, strict=True):
                if lp is not None:
                    out.logprobs[seq.seq_id] = lp
        self._prompt_logprobs(so, hidden, batch.query_start_loc, out)
        t3 = time.perf_counter()
        out.seconds = {"prepare": prepared.seconds, "forward": t2 - t1, "sample": t3 - t2}
        return out

    def _prompt_logprobs(
        self, so: SchedulerOutput, hidden: torch.Tensor, qsl: list[int], out: ModelRunnerOutput
    ) -> None:
        """Logprob of each prompt token given the ones before it (position p predicts token p + 1)."""
        for i, s in enumerate(so.scheduled):
            seq = s.seq
            if seq.params.prompt_logprobs is None or seq.prompt_logprobs is None:
                continue
            first = max(s.start, len(seq.prompt_logprobs) - 1)  # skip positions already scored (recompute)
            last = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if first >= last:
                continue
            rows = hidden[qsl[i] + first - s.start : qsl[i] + last - s.start]
            logp = torch.log_softmax(self.model.compute_logits(rows), dim=-1)  # (R, V)
            n = seq.params.prompt_logprobs
            out.prompt_logprobs[seq.seq_id] = [
                token_logprob(logp[r], seq.token_ids[first + r + 1], n) for r in range(last - first)
            ]
