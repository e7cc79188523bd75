"""Sampled tokens on the device: the scatter into the next step's input ids (exact buffer state), the host
copy behind its CPU interface, the runner's plan of which rows the device fills, and greedy float32 output
token-identical with the device path on and off, synchronous and async scheduling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.engine.device_tokens import PLACEHOLDER, HostTokens, decode_sources, scatter_tokens
from qserve.engine.step_buffers import StepBuffers
from tests.engine.test_async_scheduling import outputs, stop_workload
from tests.engine.test_compiled import ENGINE, tight_kv, workload


def test_scatter_rows_from_device_and_host() -> None:
    ids = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])  # (T,) rows 5.. are the step's padding
    sampled = torch.tensor([101, 102, 103])  # (S,) last step's tokens
    scatter_tokens(ids, sampled, torch.tensor([2, -1, 0, 2, -1]))
    assert ids.tolist() == [103, 12, 101, 103, 15, 16, 17, 18]  # -1 rows and padding untouched
    scatter_tokens(ids, sampled, torch.tensor([-1, -1]))
    assert ids.tolist() == [103, 12, 101, 103, 15, 16, 17, 18]  # all from the host: nothing moves
    scatter_tokens(ids, sampled, torch.tensor([], dtype=torch.int64))
    scatter_tokens(ids, torch.tensor([], dtype=torch.int64), torch.tensor([-1]))
    assert ids.tolist() == [103, 12, 101, 103, 15, 16, 17, 18]
    scatter_tokens(ids, sampled, torch.tensor([1] * 8))  # every row, the whole buffer
    assert ids.tolist() == [102] * 8
    with pytest.raises(IndexError):
        scatter_tokens(ids, sampled, torch.tensor([3]))  # a source row the last step does not have


def test_scatter_into_the_step_buffers() -> None:
    buf = StepBuffers(max_tokens=16, max_seqs=4, max_blocks=2, device=torch.device("cpu"))
    shape = buf.padded_shape(3, 3)
    assert shape is not None
    view = buf.fill([PLACEHOLDER, 7, PLACEHOLDER], [4, 0, 9], [4, 16, 41], [5, 1, 10], [0, 1, 2, 3],
                    [[0], [1], [2]], shape)  # fmt: skip
    sources = buf.token_sources([1, -1, 0])
    assert buf.device_bufs["token_src"][:3].tolist() == [1, -1, 0]
    scatter_tokens(buf.device_bufs["input_ids"], torch.tensor([500, 600]), sources)
    assert view.input_ids.tolist() == [600, 7, 500, 0]  # the padding row of bucket 4 stays 0
    assert buf.device_bufs["input_ids"][4:].tolist() == [0] * 13  # 12 more rows and the spare one
    assert view.positions.tolist() == [4, 0, 9, 0] and view.slot_mapping.tolist() == [4, 16, 41, -1]


def test_decode_sources() -> None:
    assert decode_sources([7, 3, 9, -1], {3: 0, 7: 2, 8: 1}) == [2, 0, -1, -1]
    assert decode_sources([], {1: 0}) == []


def test_host_tokens_on_cpu() -> None:
    t = torch.tensor([5, 6, 7])
    h = HostTokens(t)
    assert h.ready() and h.event is None and h.device_tokens is t
    t[0] = 99  # the copy is the step's, not a view of the device tensor
    assert h.tolist() == [5, 6, 7]


def _engines(path: Path, async_scheduling: bool) -> tuple[LLM, LLM]:
    args = {**ENGINE, "kv_cache_memory": tight_kv(path, "auto"), "async_scheduling": async_scheduling}
    host = LLM(str(path), enforce_eager=True, **args)  # type: ignore[arg-type]
    device = LLM(str(path), enforce_eager=True, **args)  # type: ignore[arg-type]
    assert not host.engine.runner.device_tokens  # CPU default: the host path
    device.engine.runner.device_tokens = True
    return host, device


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_identical_with_device_tokens(async_scheduling: bool, tiny_llama: Path) -> None:
    host, device = _engines(tiny_llama, async_scheduling)
    prompts, params = workload(seeded=False)  # chunked prefill, preemption, prefix hits
    assert outputs(device, prompts, params) == outputs(host, prompts, params)
    assert device.metrics()["preemptions_total"] > 0
    prompts, params = stop_workload(host)  # stop strings, logprobs, prompt logprobs
    assert outputs(device, prompts, params) == outputs(host, prompts, params)
    seeded = workload(seeded=True)
    assert outputs(device, *seeded) == outputs(host, *seeded)
    assert device.engine.runner.device_token_rows > 0 and host.engine.runner.device_token_rows == 0
    # async: the next step launched before this one's tokens reached the host (the placeholders the
    # scatter overwrites); sync never does
    assert (device.engine.steps_ahead > 0) == async_scheduling and host.engine.steps_ahead == 0
    assert all(not q.token_pending for q in device.engine.seqs.values()) and not device.engine.seqs


def test_runner_plans_device_rows(tiny_llama: Path) -> None:
    """After the first step, each decode row holds the placeholder in the filled buffer and its source is
    its row of the last step's sampled ids; the run writes the real token there."""
    llm = LLM(str(tiny_llama), enforce_eager=True, **{**ENGINE, "kv_cache_memory": 1 << 22})  # type: ignore[arg-type]
    eng, runner = llm.engine, llm.engine.runner
    runner.device_tokens = True
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(([1, 2, 3], [4, 5, 6, 7], [8, 9])):
        eng.add_request(str(i), None, p, prompt_token_ids=prompt)
    eng.step()  # the prefills: three sampled tokens, rows 0..2 in scheduling order
    assert runner._last is not None
    last_tokens, last_rows = runner._last
    so = eng.scheduler.schedule()
    assert [s.num_new_tokens for s in so.scheduled] == [1, 1, 1]
    prepared = runner.prepare(so)
    want = [last_rows[s.seq.seq_id] for s in so.scheduled]
    assert prepared.batch.scatter is not None and prepared.batch.scatter[1].tolist() == want
    assert runner.buffers.device_bufs["input_ids"][:3].tolist() == [PLACEHOLDER] * 3
    out = runner.run(so, prepared).resolve()
    newest = [s.seq.token_ids[-1] for s in so.scheduled]
    assert runner.buffers.device_bufs["input_ids"][:3].tolist() == newest
    assert newest == [int(last_tokens[r]) for r in want] and len(out.sampled) == 3


@pytest.mark.slow
def test_compiled_forward_reads_device_tokens(tiny_llama: Path) -> None:
    """The compiled (padded bucket) forward reads the scattered rows from the same persistent buffer."""
    args = {**ENGINE, "kv_cache_memory": tight_kv(tiny_llama, "auto"), "async_scheduling": True}
    host = LLM(str(tiny_llama), enforce_eager=True, **args)  # type: ignore[arg-type]
    compiled = LLM(str(tiny_llama), enforce_eager=False, **args)  # type: ignore[arg-type]
    compiled.engine.runner.device_tokens = True
    prompts, params = workload(seeded=False)
    assert outputs(compiled, prompts, params) == outputs(host, prompts, params)
    assert compiled.engine.runner.device_token_rows > 0
    torch._dynamo.reset()


def test_look_ahead_with_stop_tokens_penalties_and_aborts(tiny_llama: Path) -> None:
    """Sequences that stop on a token while the next step is already in flight (their extra step dropped),
    penalties (which need the host token: no look-ahead while such a sequence samples), max_tokens 0
    scoring and an abort between steps: the same outputs as the synchronous host path."""
    host, _ = _engines(tiny_llama, async_scheduling=False)
    _, device = _engines(tiny_llama, async_scheduling=True)
    prompts, base = workload(seeded=False)
    greedy = host.generate(prompt_token_ids=prompts, sampling_params=base)
    params = []
    for i, o in enumerate(greedy):
        out = o.token_ids
        stop = [out[5 + i]] if i % 2 == 0 else None  # stops mid-output (first occurrence wins)
        pen = 1.3 if i == 3 else 1.0
        params.append(SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=stop, repetition_penalty=pen,
                                     ignore_eos=True))  # fmt: skip
    params[5] = SamplingParams(max_tokens=0, prompt_logprobs=1)
    want = outputs(host, prompts, params)
    assert any(w[2] == "stop" for w in want)
    ahead = device.engine.steps_ahead
    assert outputs(device, prompts, params) == want
    assert device.engine.steps_ahead > ahead
    # an abort between two steps (one launched ahead in flight): the others unchanged, nothing leaks
    eng = device.engine
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(str(i), None, sp, prompt_token_ids=p)
    seen: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen[o.request_id] = o.token_ids
        steps += 1
        if steps == 6 and "2" in eng.seqs:
            eng.abort_request("2")
    for i, w in enumerate(want):
        if i != 2:
            assert seen[str(i)] == w[0], i
    assert eng.kv.block_tables == {} and eng.seqs == {} and eng.detok == {}


@pytest.mark.gpu
def test_scatter_and_host_copy_on_cuda() -> None:
    dev = torch.device("cuda")
    ids = torch.arange(10, 18, device=dev)
    sampled = torch.tensor([101, 102, 103], device=dev)
    scatter_tokens(ids, sampled, torch.tensor([2, -1, 0], device=dev))
    assert ids.tolist() == [103, 11, 101, 13, 14, 15, 16, 17]
    h = HostTokens(sampled * 2)
    assert h.event is not None and h.host.is_pinned()
    assert h.tolist() == [202, 204, 206] and h.ready()


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_cuda_graphs_with_device_tokens_match_host_eager(async_scheduling: bool, tiny_llama: Path) -> None:
    """On CUDA device tokens are the default: graphs + scatter (+ look-ahead) against eager on the host."""
    args = {**ENGINE, "device": "cuda", "kv_cache_memory": tight_kv(tiny_llama, "auto")}
    host = LLM(str(tiny_llama), enforce_eager=True, **args)  # type: ignore[arg-type]
    host.engine.runner.device_tokens = False
    fast = LLM(str(tiny_llama), enforce_eager=False, async_scheduling=async_scheduling, **args)  # type: ignore[arg-type]
    assert fast.engine.runner.device_tokens and fast.engine.runner.graphs is not None
    prompts, params = workload(seeded=False)
    assert outputs(fast, prompts, params) == outputs(host, prompts, params)
    assert fast.engine.runner.device_token_rows > 0
    assert (fast.engine.steps_ahead > 0) == async_scheduling
