"""What of CUDA graphs runs without a GPU: which steps replay which bucket, and the padded inputs a graph
reads (capture and replay themselves need CUDA: tests marked gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.engine.cuda_graphs import CudaGraphRunner
from qserve.engine.step_buffers import StepBuffers


def runner(max_tokens: int = 32, max_seqs: int = 8) -> CudaGraphRunner:
    from qserve.kernels.attention import KVLayout

    buffers = StepBuffers(max_tokens, max_seqs, 4, torch.device("cpu"))
    return CudaGraphRunner(torch.nn.Identity(), buffers, [], KVLayout(16, 32, 0), max_seq_len=64)


def test_buckets_and_choice() -> None:
    r = runner()
    assert r.sizes == [1, 2, 4, 8]  # up to min(max_num_seqs, token budget)
    assert r.bucket_for(3, 3, 3) is None  # nothing captured yet (capture failed, or enforce_eager)
    r.graphs = dict.fromkeys(r.sizes)  # type: ignore[arg-type]  # as if captured
    assert [r.bucket_for(n, n, n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert r.bucket_for(9, 9, 9) is None  # above the largest bucket: eager
    assert r.bucket_for(4, 3, 2) is None  # a prefill in the batch: eager
    assert runner(max_tokens=512, max_seqs=512).sizes[-1] == 256


def test_padded_inputs_the_graph_reads() -> None:
    r = runner()
    r.buffers.fill([7, 8, 9], [4, 0, 11], [4, 16, 43], [5, 1, 12], [0, 1, 2, 3], [[0], [1], [2]],
                   r.buffers.padded_shape(3, 3))  # fmt: skip
    ids, pos, meta = r.meta(4)
    assert ids.tolist() == [7, 8, 9, 0] and pos.tolist() == [4, 0, 11, 0]
    assert meta.slot_mapping.tolist() == [4, 16, 43, -1]  # the padding token writes no KV
    assert meta.seq_lens.tolist() == [5, 1, 12, 0]  # the padding sequence attends to nothing
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 3]
    assert (meta.num_decodes, meta.max_decode_seq_len) == (4, 64)  # fixed launch sizes of the bucket
    assert meta.block_tables[:, 0].tolist() == [0, 1, 2, 0]


@pytest.mark.gpu
def test_graphs_match_eager(tiny_llama: Path) -> None:
    prompts = [[1, 2, 3], list(range(5, 40)), [9] * 17]
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLM(str(tiny_llama), device="cuda", dtype="float32", enforce_eager=True,
                                     kv_cache_memory=1 << 24).generate(prompt_token_ids=prompts, sampling_params=p)]  # fmt: skip
    llm = LLM(str(tiny_llama), device="cuda", dtype="float32", enforce_eager=False, kv_cache_memory=1 << 24)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.graphs
    assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)] == want
