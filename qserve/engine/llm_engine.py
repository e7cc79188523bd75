"""LLMEngine: requests in, one scheduling + model step at a time, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, cast

import torch

from qserve.cache.kv_cache import KVCacheSpec, resolve_kv_dtype
from qserve.cache.kv_cache_manager import KVCacheManager
from qserve.config import EngineConfig, ModelConfig, canonical_dtype, resolve_model_path
from qserve.engine.compiled import CompiledForward, use_cache_dir
from qserve.engine.cuda_graphs import CudaGraphRunner
from qserve.engine.device_tokens import PLACEHOLDER
from qserve.engine.logits_processors import bad_words_token_ids
from qserve.engine.metrics import EngineMetrics, StepRecord
from qserve.engine.model_runner import ModelRunner, ModelRunnerOutput
from qserve.engine.outputs import NewToken, cut_at_stop, request_output
from qserve.engine.scheduler import Scheduler, SchedulerOutput
from qserve.engine.sequence import Sequence
from qserve.engine.structured import GrammarCache, GrammarState
from qserve.errors import QServeError
from qserve.kernels.attention import KVLayout
from qserve.layers.attention import AttentionMetadata
from qserve.layers.linear import prepack_cpu_linears
from qserve.models.loader import load_model, torch_dtype
from qserve.planner import engine_kv_blocks
from qserve.planner_step import cuda_graph_pool_bytes
from qserve.tokenizer import IncrementalDetokenizer, load_tokenizer
from qserve.types import RequestOutput, SamplingParams

logger = logging.getLogger("qserve")
DEFAULT_CPU_KV_CAP = 4 << 30  # bytes: cap on the CPU KV pool when no size is given


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise QServeError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise QServeError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


@dataclass
class _InFlight:
    """A launched step: its SchedulerOutput and its result, or the future of it (async scheduling)."""

    so: SchedulerOutput
    schedule_seconds: float
    ro: ModelRunnerOutput | None = None
    future: Future[ModelRunnerOutput] | None = None

    def output(self) -> ModelRunnerOutput:
        """The step's output once its run returned; its sampled ids may still be on their way to the host."""
        if self.ro is None:
            assert self.future is not None
            self.ro = self.future.result()
        return self.ro

    def result(self) -> ModelRunnerOutput:
        """The step's output with its sampled ids on the host (waits for their copy)."""
        return self.output().resolve()


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and the per-request detokenizers.

    Not thread-safe: one thread calls add_request / abort_request / step (the server wraps it).
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        path = resolve_model_path(config.model)
        self.model_config = cfg = ModelConfig.from_pretrained(path)
        self.device = resolve_device(config.device)
        self.dtype_name = cfg.dtype if config.dtype == "auto" else canonical_dtype(config.dtype)
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, cfg, torch_dtype(self.dtype_name), self.device)
        if self.device.type == "cpu":
            prepack_cpu_linears(self.model)
        self.max_model_len = min(
            config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype_name)
        self.kv_spec = KVCacheSpec(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, kv_dtype
        )
        num_blocks = self._num_blocks(config)
        if num_blocks < 1:
            raise QServeError(
                f"kv cache memory {config.kv_cache_memory} B is below one block ({self.kv_spec.bytes_per_block} B)"
            )
        self.kv = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching, cache_salt=self.kv_spec.dtype
        )
        if self.kv.capacity_tokens < self.max_model_len:
            logger.warning(
                "max_model_len %d exceeds KV capacity; lowered to %d",
                self.max_model_len,
                self.kv.capacity_tokens,
            )
            self.max_model_len = self.kv.capacity_tokens
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        layout = KVLayout(config.block_size, cfg.head_dim, self.kv_spec.quant_bits)
        caches = self.kv_spec.allocate(num_blocks, self.device)
        # torch.compile on CPU (CUDA runs eager until graphs land); steps past the token budget run eager
        compiled = None
        eager_only = [m.compile_blocker for m in self.model.modules() if getattr(m, "compile_blocker", None)]
        if not config.enforce_eager and self.device.type == "cpu" and eager_only:
            logger.warning("the forward runs eager: %s", eager_only[0])
        elif not config.enforce_eager and self.device.type == "cpu":
            compiled = CompiledForward(self.model, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model,
            caches,
            self.kv,
            layout,
            self.device,
            max_tokens=config.max_num_batched_tokens,
            max_seqs=config.max_num_seqs,
            max_blocks=-(-self.max_model_len // config.block_size),
            compiled=compiled,
        )
        if compiled is not None:
            seconds = compiled.warm_up(self.runner.buffers, caches, layout)
            logger.info("compiled the forward in %.1f s (inductor cache: %s)", seconds, use_cache_dir())
        self._layout = layout
        self.graph_pool_planned = 0  # bytes the planner estimated for the CUDA graph pool (when captured)
        if self.device.type == "cuda":
            self._check_activation_estimate(config, layout)
            if not config.enforce_eager:
                self._capture_graphs(caches, layout)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(int(self.tokenizer.eos_token_id))
        self.seqs: dict[str, Sequence] = {}
        self.detok: dict[int, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self._generator = torch.Generator().manual_seed(config.seed)
        self.stats = EngineMetrics()
        self._last_forward_end = 0.0
        self._pending_after_last = False  # whether work was left when the last step ended
        self.on_scheduled: Callable[[], None] | None = None  # called after scheduling a non-empty step
        self._grammars: GrammarCache | None = None  # built on the first structured request
        self._compiling: list[Sequence] = []  # waiting sequences whose grammar is not ready yet
        self._inflight: _InFlight | None = None  # async scheduling: the launched step not yet applied
        self._step_thread: ThreadPoolExecutor | None = None  # async scheduling: runs the launched steps
        self.steps_ahead = 0  # steps launched before the previous step's sampled ids reached the host

    def set_step_threads(self, threads_for: Callable[[int], int]) -> None:
        """Run a step of N tokens on ``threads_for(N)`` torch threads (CPU), compiling the forward at every
        other count the policy uses now, so that nothing compiles while serving."""
        self.runner.threads_for = threads_for
        compiled, buffers = self.runner.compiled, self.runner.buffers
        if compiled is None:
            return
        counts = {threads_for(n) for n in range(1, buffers.max_tokens + 1)} - {torch.get_num_threads()}
        for n in sorted(counts):
            seconds = compiled.warm_up(buffers, self.runner.kv_caches, self._layout, threads=n)
            logger.info("compiled the forward for %d threads in %.1f s", n, seconds)

    @property
    def grammars(self) -> GrammarCache:
        if self._grammars is None:
            self._grammars = GrammarCache(
                self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids)
            )
        return self._grammars

    def _num_blocks(self, config: EngineConfig) -> int:
        """KV pool size, by the planner's formulas (``qserve plan`` prints the same numbers)."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        act_bytes = torch_dtype(self.dtype_name).itemsize
        return engine_kv_blocks(
            self.kv_spec, self.model_config, config, self.max_model_len, act_bytes, free, DEFAULT_CPU_KV_CAP,
            self._weights_kind(),
        )  # fmt: skip

    def _weights_kind(self) -> str:
        """int8 | int4 | nf4 | fp4 for a quantized checkpoint, else float (the graph pool's matmul scratch)."""
        from qserve.kernels.packing import QuantSpec

        spec = QuantSpec.from_config(self.model_config.quantization)
        return spec.weights if spec is not None else "float"

    def _capture_graphs(self, caches: list[torch.Tensor], layout: KVLayout) -> None:
        """CUDA graphs of the decode buckets; a capture failure logs and leaves the engine eager."""
        graphs = CudaGraphRunner(self.model, self.runner.buffers, caches, layout, self.max_model_len)
        try:
            seconds = graphs.capture()
        except Exception as e:  # e.g. an op that syncs the host: eager still serves every step
            logger.warning("CUDA graph capture failed, running eager: %s", e)
            return
        self.runner.graphs = graphs
        c = self.config
        self.graph_pool_planned = planned = cuda_graph_pool_bytes(
            self.model_config, c.max_num_seqs, c.max_num_batched_tokens, self.max_model_len,
            torch_dtype(self.dtype_name).itemsize, self._weights_kind(),
        )  # fmt: skip
        logger.info(
            "captured %d CUDA graphs (decode buckets %s) in %.1f s: pool %.1f MiB measured, %.1f MiB planned "
            "(%.1f MiB of device memory in all)",
            len(graphs.graphs), graphs.sizes, seconds, graphs.memory_bytes / 2**20, planned / 2**20,
            graphs.device_bytes / 2**20,
        )  # fmt: skip
        if graphs.memory_bytes > planned:
            logger.warning(
                "CUDA graph pool: measured %d B, above the planned %d B; the KV pool was sized with the "
                "estimate, so the device has %d B less headroom than planned",
                graphs.memory_bytes, planned, graphs.memory_bytes - planned,
            )  # fmt: skip

    def _check_activation_estimate(self, config: EngineConfig, layout: KVLayout) -> None:
        """Profile one full-budget prefill step on the GPU and log where the planner's activation estimate
        is off by more than 5% (the KV pool was sized with the estimate). Diagnostic only: never fails."""
        from qserve.planner import activation_bytes

        try:
            t = min(config.max_num_batched_tokens, self.kv.capacity_tokens, self.max_model_len)
            dev, rows = self.device, min(config.max_num_seqs, t)
            nblk = -(-t // config.block_size)
            meta = AttentionMetadata(
                slot_mapping=torch.arange(t, device=dev),
                block_tables=torch.arange(nblk, dtype=torch.int32, device=dev)[None],
                seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
                query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
                kv_layout=layout,
            )
            ids = torch.zeros(t, dtype=torch.int64, device=dev)
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            with torch.inference_mode():
                hidden = self.model(ids, torch.arange(t, device=dev), meta, self.runner.kv_caches)
                self.model.compute_logits(hidden[:rows])
            torch.cuda.synchronize(dev)
            measured = torch.cuda.max_memory_allocated(dev) - base
            planned = activation_bytes(
                self.model_config,
                config.max_num_batched_tokens,
                config.max_num_seqs,
                torch_dtype(self.dtype_name).itemsize,
            )
            if abs(measured - planned) > 0.05 * planned:
                logger.warning(
                    "activation peak: planned %d B, measured %d B in a %d-token profile step",
                    planned,
                    measured,
                    t,
                )
        except Exception as e:  # the check must never stop the engine from starting
            logger.warning("activation profile skipped: %s", e)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> Sequence:
        if request_id in self.seqs:
            raise QServeError(f"duplicate request id {request_id!r}")
        if prompt_token_ids is None:
            if prompt is None:
                raise QServeError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = list(self.tokenizer.encode(prompt))
        if not prompt_token_ids:
            raise QServeError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise QServeError(f"prompt token ids must be in [0, {vocab})")
        n = len(prompt_token_ids)
        if n >= self.max_model_len and params.max_tokens > 0 or n > self.max_model_len:
            raise QServeError(f"prompt has {n} tokens; this model's max_model_len is {self.max_model_len}")
        gen = None if params.greedy else self._generator
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        seq = Sequence(
            seq_id=next(self._ids),
            request_id=request_id,
            prompt=prompt,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=n,
            params=params,
            max_total_tokens=min(n + params.max_tokens, self.max_model_len),
            generator=gen,
            logprobs=[] if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        if params.bad_words:
            seq.bad_words_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
        if params.min_tokens:
            stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else self.eos_token_ids)
            seq.min_tokens_stop_ids = sorted(stop_ids)
        if params.structured_outputs is not None:
            seq.grammar = GrammarState(self.grammars.submit(params.structured_outputs))
            if not seq.grammar.poll():
                self._compiling.append(seq)
        self.seqs[request_id] = seq
        self.detok[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.skip_special_tokens
        )
        self.scheduler.add(seq)
        self.stats.prompt_tokens_total += n
        return seq

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self.detok.pop(seq.seq_id, None)
            self.stats.finished(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one model step and return the requests that made progress in it.

        Synchronous (the default): schedule, run, apply, emit. With ``async_scheduling`` the next step is
        scheduled and launched on the step thread as soon as this one's tokens are applied, and this step's
        outputs are detokenized (and, in the server, sent) while it computes; with device tokens too (the
        default on CUDA) it is launched before this step's sampled ids reach the host (`_look_ahead`)."""
        failed = self._poll_grammars()
        flight = self._inflight or self._launch()
        self._inflight = None
        if flight is None:
            if self._compiling and not failed:  # only compiling requests are left: wait a moment, not spin
                wait([q.grammar.future for q in self._compiling if q.grammar], 0.01, FIRST_COMPLETED)
            return failed
        ahead = self._look_ahead(flight)
        ro = flight.result()
        t2 = time.perf_counter()
        new = self._apply(flight.so, ro, advanced=ahead)
        t3 = time.perf_counter()
        if self.config.async_scheduling and not ahead:
            self._inflight = self._launch()
        t4 = time.perf_counter()
        outputs = failed + [self._emit(n) for n in new]
        t5 = time.perf_counter()
        phases = {"schedule": flight.schedule_seconds, "detokenize": t3 - t2 + t5 - t4, **ro.seconds}
        phases["total"] = flight.schedule_seconds + sum(ro.seconds.values()) + phases["detokenize"]
        # a gap counts only when this step followed the last one with no idle wait in between
        gap = ro.forward_start - self._last_forward_end if self._pending_after_last else None
        self.stats.record_step(flight.so, StepRecord(ro.forward_end, ro.device_seconds, phases), gap)
        self._last_forward_end = ro.forward_end
        self._pending_after_last = self.has_unfinished_requests()
        return outputs

    def _launch(self) -> _InFlight | None:
        """Schedule a step and start it: on the step thread under async scheduling, else run it here."""
        t0 = time.perf_counter()
        so = self.scheduler.schedule()
        seconds = time.perf_counter() - t0
        if so.is_empty:
            return None
        if self.on_scheduled is not None:
            self.on_scheduled()
        if not self.config.async_scheduling:
            return _InFlight(so, seconds, ro=self.runner.execute(so))
        prepared = self.runner.prepare(so)
        if self._step_thread is None:
            self._step_thread = ThreadPoolExecutor(1, thread_name_prefix="qserve-step")
        return _InFlight(so, seconds, future=self._step_thread.submit(self.runner.run, so, prepared))

    def _look_ahead(self, flight: _InFlight) -> bool:
        """Async scheduling with device tokens: as soon as ``flight``'s run returned (on CUDA: its work is
        queued), advance its sequences, give each that sampled a placeholder token, and launch the next
        step, before the sampled ids reach the host (vLLM's async scheduling, SGLang's overlap): the device
        scatters them into the next step's inputs and `_append_token` writes them over the placeholders.
        Not when a sampled sequence's next logits need its token on the host (logits processors, a
        grammar) or it only scores its prompt (max_tokens 0). Returns whether it launched."""
        if not (self.config.async_scheduling and self.runner.device_tokens):
            return False
        ids = set(flight.output().pending_ids)
        sampled = [s.seq for s in flight.so.scheduled if s.seq.seq_id in ids and not s.seq.is_finished]
        if any(
            q.params.processes_logits or q.grammar is not None or not q.params.max_tokens for q in sampled
        ):
            return False
        self._advance(flight.so)
        for seq in sampled:
            seq.token_ids.append(PLACEHOLDER)
            seq.token_pending = True
        self._inflight = self._launch()
        self.steps_ahead += self._inflight is not None
        return True

    def _advance(self, so: SchedulerOutput) -> None:
        """Count each scheduled sequence's step as computed and publish its full KV blocks."""
        for s in so.scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted, or stopped by a stop string, after this step was launched
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)

    def _apply(self, so: SchedulerOutput, ro: ModelRunnerOutput, advanced: bool = False) -> list[NewToken]:
        """Advance each scheduled sequence by its step (unless `_look_ahead` did); finish those its new
        token ids finish."""
        if not advanced:
            self._advance(so)
        new: list[NewToken] = []
        for s in so.scheduled:
            seq = s.seq
            if seq.is_finished:
                continue
            if seq.prompt_logprobs is not None and seq.seq_id in ro.prompt_logprobs:
                seq.prompt_logprobs.extend(ro.prompt_logprobs[seq.seq_id])
            if seq.seq_id in ro.sampled:
                new.append(self._append_token(seq, ro.sampled[seq.seq_id], ro.logprobs.get(seq.seq_id)))
        return new

    def _poll_grammars(self) -> list[RequestOutput]:
        """Mark sequences whose grammar finished compiling schedulable; finish those whose compile failed."""
        if not self._compiling:
            return []
        failed: list[RequestOutput] = []
        still: list[Sequence] = []
        for seq in self._compiling:
            g = seq.grammar
            if seq.is_finished or g is None:
                continue
            if not g.poll():
                still.append(seq)
            elif g.error is not None:
                logger.warning("request %s: %s", seq.request_id, g.error)
                self._finish(seq, "abort")
                failed.append(request_output(seq, "", []))
        self._compiling = still
        return failed

    def _append_token(self, seq: Sequence, token: int, logprob: Any) -> NewToken:
        """The fast half of a new token: everything the token id alone decides."""
        p = seq.params
        detok = self.detok[seq.seq_id]
        if p.max_tokens == 0:  # prompt scoring only (echo): nothing is generated
            self._finish(seq, "length", retire=False)
            return NewToken(seq, None, detok)
        if seq.token_pending:  # launched ahead: the placeholder the next step already ran with
            seq.token_ids[-1], seq.token_pending = token, False
        else:
            seq.token_ids.append(token)
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        self.stats.generation_tokens_total += 1
        reason = None
        if seq.grammar is not None and seq.grammar.matcher is not None:
            if not seq.grammar.accept(token):
                logger.warning("request %s: token %d rejected by its grammar", seq.request_id, token)
            elif seq.grammar.terminated:
                reason = "stop"
        if (token in self.eos_token_ids and not p.ignore_eos) or token in (p.stop_token_ids or ()):
            reason = "stop"
        elif seq.num_tokens >= seq.max_total_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, retire=False)  # emit retires it, after the last detokenization
        return NewToken(seq, token, detok)

    def _emit(self, new: NewToken) -> RequestOutput:
        """The slow half: detokenize, cut at a stop string (which finishes the sequence), build the output."""
        seq, p = new.seq, new.seq.params
        delta = ""
        if new.token is not None:
            delta = new.detok.step([new.token])
            if p.stop and delta and seq.num_output_tokens >= p.min_tokens:  # vLLM: none before min_tokens
                stops = cast(list[str], p.stop)  # SamplingParams made it a list
                seq.output_text, delta, hit = cut_at_stop(seq.output_text, delta, stops)
                if hit and seq.is_finished:  # EOS or max_tokens came with it: the stop string names it
                    seq.finish_reason = "stop"
                elif hit:
                    self._finish(seq, "stop", retire=False)
            else:
                seq.output_text += delta
        if seq.is_finished:
            self._retire(seq)
        return request_output(seq, delta, [] if new.token is None else [new.token])

    def _finish(self, seq: Sequence, reason: str, retire: bool = True) -> None:
        """Take a sequence out of the scheduler (its blocks freed) and, unless its last token is still to be
        emitted, out of the engine's books."""
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        if retire:
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self.detok.pop(seq.seq_id, None)
        self.stats.finished(seq)

    def metrics(self) -> dict[str, Any]:
        """The metrics of DESIGN §4 by name, without the ``qserve_`` prefix."""
        return self.stats.snapshot(self)
