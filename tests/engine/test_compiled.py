"""The compiled forward (torch.compile, inductor) against eager: no graph breaks, and in float32 the same
tokens with chunked prefill, preemption, prefix caching, int8/int4 KV and int4 weights, greedy and seeded.

Compiling costs 10-30 s per engine on the 2-core CI machine, so each configuration builds one compiled
engine and runs every check on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.cache.kv_cache import KVCacheSpec, resolve_kv_dtype
from qserve.config import ModelConfig
from qserve.converters import convert
from qserve.engine.step_buffers import StepShape
from qserve.kernels.cpu_ops import step_plans
from qserve.layers.attention import AttentionMetadata

pytestmark = pytest.mark.slow


def workload(seeded: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    """Mixed lengths and three prompts sharing a 40-token prefix; greedy, or seeded sampling."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    shared = rand(40)
    prompts = [rand(3), rand(70), shared + rand(5), rand(17), shared + rand(9), rand(1), shared, rand(33)]
    if not seeded:
        return prompts, [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)] * len(prompts)
    return prompts, [
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]


# a small token budget (chunked prefill) and a KV pool of 12 blocks (192 tokens: preemption)
ENGINE = dict(dtype="float32", max_num_batched_tokens=32, max_num_seqs=8)


def tight_kv(path: Path, kv: str) -> int:
    cfg = ModelConfig.from_pretrained(path)
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, resolve_kv_dtype(kv, "float32"))
    return 12 * spec.bytes_per_block


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # each engine compiles the same model code again: keep one test's graphs from counting against the next
    yield
    torch._dynamo.reset()


def run(llm: LLM, seeded: bool = False) -> list[list[int]]:
    prompts, params = workload(seeded)
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


def check_same_tokens(path: Path, **kw: object) -> LLM:
    """Greedy: token-identical compiled and eager. Seeded sampling: reproducible in each mode (a sample
    drawn at a CDF boundary may legitimately differ between modes, whose float32 sums are ordered apart)."""
    args = {**ENGINE, "kv_cache_memory": tight_kv(path, str(kw.get("kv_cache_dtype", "auto"))), **kw}
    eager = LLM(str(path), enforce_eager=True, **args)  # type: ignore[arg-type]
    compiled = LLM(str(path), enforce_eager=False, **args)  # type: ignore[arg-type]
    assert compiled.engine.runner.compiled is not None and eager.engine.runner.compiled is None
    assert run(compiled) == run(eager)
    steps = compiled.engine.runner.steps_by_path
    assert steps["decode_graph"] > 0 and steps["compiled"] > 0, steps  # both compiled graphs ran
    assert compiled.metrics()["preemptions_total"] > 0  # the budget did force recompute preemption
    assert compiled.metrics()["prefix_cache_hit_rate"] > 0
    for llm in (compiled, eager):
        assert run(llm, seeded=True) == run(llm, seeded=True)
    return compiled


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_compiled_matches_eager(arch: str, tiny_model_factory: Callable[..., Path]) -> None:
    check_same_tokens(tiny_model_factory(arch))


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_compiled_matches_eager_quantized_kv(kv: str, tiny_llama: Path) -> None:
    check_same_tokens(tiny_llama, kv_cache_dtype=kv)


def test_compiled_matches_eager_int4_weights(tiny_llama: Path, tmp_path: Path) -> None:
    q4 = convert(tiny_llama, tmp_path / "q4", weights="int4", group_size=32, progress=False)
    llm = check_same_tokens(q4)
    # padded rows sample nothing: a lone decode ran at bucket 1, bigger batches at their bucket
    assert llm.engine.runner.buffers.padded_shape(3, 3) == StepShape(4, 4)


def explain(llm: LLM, decode: bool) -> object:
    """Dynamo's account of the forward on a mixed step, or on a decode-only step (two decodes padded to 4
    rows, tables cut to 2 blocks) as the compiled decode graph runs it."""
    runner = llm.engine.runner
    if decode:
        view = runner.buffers.fill([1, 2], [4, 7], [4, 23], [5, 8], [0, 1, 2], [[0], [1]], StepShape(4, 4))
        meta = view.metadata(runner.kv_layout)
        meta.block_tables, meta.decode_graph = meta.block_tables[:, :2], True
    else:
        view = runner.buffers.fill([1, 2, 3], [0, 1, 2], [0, 1, 2], [3], [0, 3], [[0]], StepShape(4, 3))
        meta = AttentionMetadata(view.slot_mapping, view.block_tables, view.seq_lens, view.query_start_loc,
                                 runner.kv_layout)  # fmt: skip
    with torch.inference_mode(), step_plans():
        return torch._dynamo.explain(runner.model)(view.input_ids, view.positions, meta, runner.kv_caches)


@pytest.mark.parametrize(
    ("arch", "kw"),
    [
        ("llama", dict(dtype="bfloat16")),
        ("llama", dict(dtype="bfloat16", kv_cache_dtype="int8")),
        ("llama", dict(dtype="float32", kv_cache_dtype="int4")),
        ("qwen3", dict(dtype="bfloat16")),
        ("mistral", dict(dtype="float32")),
    ],
)
def test_no_graph_breaks(arch: str, kw: dict[str, str], tiny_model_factory: Callable[..., Path]) -> None:
    llm = LLM(str(tiny_model_factory(arch)), enforce_eager=True, kv_cache_memory=1 << 20, **kw)
    for decode in (False, True):
        ex = explain(llm, decode)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons  # type: ignore[attr-defined]


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_no_graph_breaks_quantized_weights(weights: str, tiny_llama: Path, tmp_path: Path) -> None:
    q = convert(tiny_llama, tmp_path / weights, weights=weights, group_size=32, progress=False)
    llm = LLM(str(q), enforce_eager=True, kv_cache_memory=1 << 20)
    for decode in (False, True):
        ex = explain(llm, decode)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons  # type: ignore[attr-defined]


def test_serving_compiles_nothing_after_warm_up(tiny_llama: Path) -> None:
    """The served defaults (2048-token budget, 256 sequences): a one-sequence prefill, decodes of one and
    of three sequences and a full-budget step reuse the warm-up's graphs (a step view as long as its buffer
    used to make dynamo guard on that, and the first 128-token prompt compiled again while serving)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _serve_and_count_graphs(tiny_llama)
    finally:
        torch.set_num_threads(threads)


def _serve_and_count_graphs(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), enforce_eager=False, kv_cache_memory=64 << 20)
    # the server's policy: 2 threads for steps of at most 2 tokens and for big prefills (graphs are per count)
    llm.engine.set_step_threads(lambda n: 2 if n <= 2 or n >= 256 else 1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    # the last group fills the 2048-token budget (five 450-token prompts, chunked)
    for prompts in ([list(range(5, 133))], [[7] * 9, [8] * 20, [9] * 40], [[5 + i] * 450 for i in range(5)]):
        llm.generate(prompt_token_ids=prompts, sampling_params=[greedy] * len(prompts))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert llm.engine.runner.steps_by_path["eager"] == 0, llm.engine.runner.steps_by_path


def test_enforce_eager_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from qserve.config import EngineConfig

    monkeypatch.setenv("QSERVE_ENFORCE_EAGER", "1")
    assert EngineConfig(model="x").enforce_eager
    monkeypatch.setenv("QSERVE_ENFORCE_EAGER", "0")
    assert not EngineConfig(model="x").enforce_eager
    assert EngineConfig(model="x", enforce_eager=True).enforce_eager
