"""Builds the packed batch for a SchedulerOutput, runs the model, and samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qserve.cache.kv_cache_manager import KVCacheManager
from qserve.engine.logits_processors import prepare_logits
from qserve.engine.sampler import sample, token_logprob
from qserve.engine.scheduler import SchedulerOutput
from qserve.kernels.attention import KVLayout
from qserve.layers.attention import AttentionMetadata
from qserve.models.registry import CausalLM
from qserve.types import TokenLogprob


@dataclass
class ModelRunnerOutput:
    """Per sequence id: the sampled token (only sequences that reached their end this step) and logprobs."""

    sampled: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> time: prepare, forward, sample


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        kv: KVCacheManager,
        kv_layout: KVLayout,
        device: torch.device,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.kv = kv
        self.kv_layout = kv_layout
        self.block_size = kv.block_size
        self.device = device
        # CPU: torch threads for a step of N tokens (None: leave torch's setting alone). A server sharing the
        # cores with its HTTP process gives decode steps one core fewer but big prefills every core.
        self.threads_for: Callable[[int], int] | None = None

    def _prepare(
        self, so: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        tables: list[list[int]] = []
        logits_rows: list[int] = []  # packed row whose logits are sampled, per sampling sequence
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
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            seq_lens=seq_lens,
            query_start_loc=qsl,
            num_decodes=num_decodes,
            kv_layout=self.kv_layout,
        )
        if dev.type == "cuda":  # the Triton kernels read lengths from device memory
            meta.seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
            meta.query_start_loc_tensor = torch.tensor(qsl, dtype=torch.int32, device=dev)
            meta.max_decode_seq_len = max(seq_lens[:num_decodes], default=1)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, logits_rows

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if (
            self.threads_for is not None
            and (n := self.threads_for(so.num_batched_tokens)) != torch.get_num_threads()
        ):
            torch.set_num_threads(n)
        t0 = time.perf_counter()
        ids, pos, meta, logits_rows = self._prepare(so)
        t1 = time.perf_counter()
        hidden = self.model(ids, pos, meta, self.kv_caches)  # (T, hidden)
        sampling = [s.seq for s in so.scheduled if s.samples]
        logits = self.model.compute_logits(hidden[logits_rows]) if sampling else None  # (S, V)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if logits is not None:
            procs = prepare_logits(sampling, logits.shape[-1], logits.device)
            tokens, lps = sample(logits, [q.params for q in sampling], [q.generator for q in sampling], procs)
            for seq, tok, lp in zip(sampling, tokens, lps, strict=True):
                out.sampled[seq.seq_id] = tok
                if lp is not None:
                    out.logprobs[seq.seq_id] = lp
        self._prompt_logprobs(so, hidden, meta.query_start_loc, out)
        t3 = time.perf_counter()
        out.seconds = {"prepare": t1 - t0, "forward": t2 - t1, "sample": t3 - t2}
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
