"""The `qserve` command line: a thin typer layer over the engine, converter, planner and server.

Every error a user can cause ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from qserve.errors import QServeError

app = typer.Typer(
    help="qserve: quantization-aware, memory-efficient LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors(fn: F) -> F:
    """Turn QServeError (and a missing file) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QServeError as e:
            fail(str(e))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            fail(f"{e.strerror}: {e.filename}")

    return wrapper  # type: ignore[return-value]


DtypeOpt = Annotated[
    str, typer.Option(help="Compute dtype: auto (the checkpoint's), float32, float16, bfloat16.")
]
KvOpt = Annotated[
    str, typer.Option("--kv-cache-dtype", help="KV cache dtype: auto, fp16, bf16, fp32, int8, int4.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


def check_engine_flags(model: str, device: str, dtype: str, kv_cache_dtype: str) -> None:
    """The engine's flags, checked before torch is imported or anything loads."""
    from qserve.config import EngineConfig, resolve_model_path

    resolve_model_path(model)
    EngineConfig(model=model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype)


@contextlib.contextmanager
def eval_progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr fed with (tokens scored, tokens in all), or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:  # a log file or a CI job: plain lines, one per batch of windows

        def line(done: int, total: int) -> None:
            typer.echo(f"eval: scored {done}/{total} tokens", err=True)

        yield line
        return

    columns = (TextColumn("scoring tokens"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("eval", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


@app.command()
@user_errors
def generate(
    model: Annotated[str, typer.Argument(help="Model directory (HF or qserve-converted), or 'demo'.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling (0 = off).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    dtype: DtypeOpt = "auto",
    kv_cache_dtype: KvOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Generate a completion for PROMPT and stream it to stdout."""
    from qserve.types import SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    check_engine_flags(model, device, dtype, kv_cache_dtype)
    from qserve.engine.llm import LLM

    # one prompt: compiling at start-up would cost more than it saves, so this command runs eager
    llm = LLM(
        model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_num_seqs=1, enforce_eager=True
    )
    engine = llm.engine
    engine.add_request("cli", prompt, params)
    sys.stdout.write(prompt)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Model directory (HF or qserve-converted), or 'demo'.")],
    data: Annotated[
        Path, typer.Option(help="Text file to score ('demo' data: the demo model's held-out text).")
    ],
    context: Annotated[int, typer.Option(help="Window length in tokens (non-overlapping).")] = 512,
    max_eval_tokens: Annotated[
        int | None, typer.Option(help="Use at most this many tokens of the text.")
    ] = None,
    dtype: DtypeOpt = "auto",
    kv_cache_dtype: KvOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {perplexity, tokens, tokens_per_second}.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Perplexity of MODEL on a text file, through qserve's own runtime."""
    if context < 2:
        raise QServeError(f"--context must be at least 2, got {context}")
    if max_eval_tokens is not None and max_eval_tokens < 2:
        raise QServeError(f"--max-eval-tokens must be at least 2, got {max_eval_tokens}")
    if not data.is_file():
        raise QServeError(f"data file not found: {data}")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QServeError(f"{data} is not UTF-8 text") from None
    check_engine_flags(model, device, dtype, kv_cache_dtype)
    from qserve.engine.llm import LLM
    from qserve.eval import perplexity

    # scoring is long prefills, where the forward is compute-bound: eager, with no compile at start-up
    llm = LLM(
        model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=4096,
        enforce_eager=True,
    )  # fmt: skip
    with eval_progress(progress) as report:
        res = perplexity(llm, text, context=context, max_tokens=max_eval_tokens, progress=report)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "perplexity": res.perplexity,
                    "tokens": res.tokens,
                    "tokens_per_second": res.tokens_per_second,
                }
            )
        )
    else:
        typer.echo(
            f"perplexity {res.perplexity:.4f} over {res.tokens} tokens ({res.tokens_per_second:.0f} tokens/s)"
        )


@app.command()
@user_errors
def plan(
    model: Annotated[str, typer.Argument(help="Model directory, 'demo', or a preset such as llama-3.1-8b.")],
    memory: Annotated[str | None, typer.Option(help="Memory budget, e.g. 24GiB (no reserve).")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU preset: H100-80GB, H200, A100-80GB, L4, ...")] = None,
    weights: Annotated[
        str, typer.Option(help="auto (as stored), fp16, bf16, int8 or int4 (group 128).")
    ] = "auto",
    kv_cache_dtype: Annotated[
        str, typer.Option("--kv-cache-dtype", help="auto, fp16, bf16, fp32, int8, int4.")
    ] = "auto",
    context: Annotated[
        int | None, typer.Option(help="Tokens per sequence (default: min(max positions, 4096)).")
    ] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Plan for this many sequences.")] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Write concurrent sequences vs context length to this PNG.")
    ] = None,
    price_per_hour: Annotated[
        float | None, typer.Option(help="GPU price (USD/hour) for a cost per 1M output tokens estimate.")
    ] = None,
    target_rps: Annotated[
        float | None, typer.Option(help="Add the replicas this many requests/s need (with the lengths).")
    ] = None,
    prompt_len: Annotated[int | None, typer.Option(help="With --target-rps: prompt tokens.")] = None,
    output_len: Annotated[int | None, typer.Option(help="With --target-rps: output tokens.")] = None,
    replica_tps: Annotated[
        float | None,
        typer.Option(help="Measured output tokens/s of one replica (else the --gpu roofline estimate)."),
    ] = None,
    enforce_eager: Annotated[
        bool, typer.Option("--enforce-eager", help="Plan serve --enforce-eager: no CUDA graph pool.")
    ] = False,
) -> None:
    """Exact memory plan before loading: weights, KV capacity, concurrent sequences, batch sizes."""
    from qserve.planner import plan as make_plan
    from qserve.planner import print_plan, save_plot
    from qserve.utils import parse_size

    load = (target_rps, prompt_len, output_len)
    if any(v is not None for v in (*load, replica_tps)) and None in load:
        raise QServeError("replicas need --target-rps, --prompt-len and --output-len together")
    if target_rps is not None and context is None:
        context = (prompt_len or 0) + (output_len or 0)  # plan each replica for the load's sequences
    p = make_plan(
        model,
        memory=parse_size(memory) if memory is not None else None,
        gpu=gpu,
        weights=weights.lower(),
        kv_cache_dtype=kv_cache_dtype,
        context=context,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        price_per_hour=price_per_hour,
        enforce_eager=enforce_eager,
    )
    if plot is not None:
        save_plot(p, str(plot))
        typer.echo(f"wrote {plot}", err=as_json)  # stderr with --json, so stdout stays one JSON object
    fleet = None
    if target_rps is not None:
        from qserve.planner_replicas import plan_replicas

        fleet = plan_replicas(
            p,
            target_rps=target_rps,
            prompt_len=prompt_len or 0,
            output_len=output_len or 0,
            replica_tps=replica_tps,
        )
    if as_json:
        out = p.to_json() | ({"replicas": fleet.to_json()} if fleet else {})
        typer.echo(json.dumps(out, indent=2))
        return
    print_plan(p)
    if fleet is not None:
        from qserve.planner_replicas import replica_lines

        typer.echo("\n".join(replica_lines(fleet)))


@app.command()
@user_errors
def serve(
    model: Annotated[
        str, typer.Argument(help="Model directory (HF or qserve-converted), or 'demo'.")
    ] = "demo",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    kv_cache_dtype: KvOpt = "auto",
    kv_cache_memory: Annotated[
        str | None, typer.Option(help="KV cache pool size, e.g. 2GiB (default: sized from max-num-seqs).")
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(help="Weights + KV cache: a FRACTION of device memory (0.9) or a SIZE (8GiB)."),
    ] = None,
    max_num_seqs: Annotated[str, typer.Option(help="Most sequences decoding at once: auto or N.")] = "auto",
    max_model_len: Annotated[
        int | None, typer.Option(help="Longest prompt + output in tokens (default: the model's).")
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Waiting requests beyond which new ones get 429.")] = 256,
    api_key: Annotated[
        str | None, typer.Option(envvar="QSERVE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients use (default: MODEL as given).")
    ] = None,
    shutdown_timeout: Annotated[
        int, typer.Option(help="Seconds in-flight requests get to finish after SIGTERM.")
    ] = 30,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads of the engine process (default on CPU: every core but one)."),
    ] = None,
    replicas: Annotated[
        str | None,
        typer.Option(help="Run N engine replicas, or 'auto' (autoscaled), on Ray Serve (qserve[cluster])."),
    ] = None,
    min_replicas: Annotated[
        int | None, typer.Option(help="With --replicas auto: fewest (default 1).")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(help="With --replicas auto: most (default: what the cluster holds).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join ('auto', host:port); default: start one here.")
    ] = None,
    disable_access_log: Annotated[
        bool, typer.Option("--disable-access-log", help="No access-log line per request.")
    ] = False,
    log_format: Annotated[
        str, typer.Option(help="text, or json (one object per line, for log shippers).")
    ] = "text",
    stats_interval: Annotated[
        float, typer.Option(help="Seconds between stats lines while busy (0: none).")
    ] = 10.0,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="Parse tool calls for tool_choice 'auto': hermes (Hermes/Qwen, the demo) or llama3_json."
        ),
    ] = None,
    replica_cpus: Annotated[float, typer.Option(help="CPUs each replica reserves in Ray.")] = 1.0,
    replica_gpus: Annotated[
        float | None, typer.Option(help="GPUs each replica reserves (default: 1 on a GPU cluster).")
    ] = None,
    enforce_eager: Annotated[
        bool, typer.Option("--enforce-eager", help="Run every step eagerly: no torch.compile at start-up.")
    ] = False,
    async_scheduling: Annotated[
        bool,
        typer.Option(
            "--async-scheduling",
            help="Launch step N+1 before step N's outputs are detokenized and sent (overlap host and device).",
        ),
    ] = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (completions, chat, models, health, metrics)."""
    from qserve.server.launch import ServeOptions, run_server

    if replicas is None and (min_replicas, max_replicas, ray_address) != (None, None, None):
        raise QServeError("--min-replicas, --max-replicas and --ray-address need --replicas N|auto")
    from qserve.server.tool_parsers import TOOL_PARSERS

    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise QServeError(
            f"unknown --tool-call-parser {tool_call_parser!r}: choose from {', '.join(TOOL_PARSERS)}"
        )
    options = ServeOptions(
        model=model,
        host=host,
        port=port,
        device=device,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory=kv_cache_memory,
        memory_budget=memory_budget,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_queue=max_queue,
        api_key=api_key,
        served_model_name=served_model_name,
        shutdown_timeout=shutdown_timeout,
        threads=threads,
        enforce_eager=enforce_eager,
        async_scheduling=async_scheduling,
        access_log=not disable_access_log,
        log_format=log_format,
        stats_interval=stats_interval,
        tool_call_parser=tool_call_parser,
    )
    if replicas is None:  # one server in this process; Ray is never imported
        run_server(options)
        return
    from qserve.cluster.launch import ClusterOptions, run_cluster

    copts = ClusterOptions(
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        ray_address=ray_address,
        replica_cpus=replica_cpus,
        replica_gpus=replica_gpus,
    )
    run_cluster(options, copts)


from qserve.cli_convert import convert_command  # noqa: E402 (registered after the commands above)

app.command("convert")(user_errors(convert_command))

from qserve.bench.cli import bench_command  # noqa: E402

app.command("bench")(user_errors(bench_command))


def _click_errors() -> tuple[
    tuple[type[Exception], ...], tuple[type[Exception], ...], tuple[type[Exception], ...]
]:
    """(usage errors, no-args-is-help, aborts) of the click typer runs on: its vendored copy (typer >= 0.20)
    and/or the click package."""
    usage: list[type[Exception]] = []
    no_args: list[type[Exception]] = []
    abort: list[type[Exception]] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.UsageError)
        if hasattr(mod, "Abort"):
            abort.append(mod.Abort)
        if hasattr(mod, "NoArgsIsHelpError"):
            no_args.append(mod.NoArgsIsHelpError)
    abort.append(typer.Abort)
    return tuple(usage), tuple(no_args), tuple(abort)


def main() -> None:
    """The `qserve` entry point. A usage error (a mistyped flag, a missing argument, a value of the wrong
    type) is one ``error:`` line on stderr and exit code 2, like every other user error, instead of
    click's boxed usage text."""
    usage, no_args, abort = _click_errors()
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="qserve", standalone_mode=False)
    except no_args as e:  # bare `qserve` or a bare group: the help, as before
        ctx = getattr(e, "ctx", None)
        typer.echo(ctx.get_help() if ctx is not None else "", err=True)
        sys.exit(2)
    except usage as e:
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "qserve"
        message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
        typer.echo(f"error: {message} (see '{where} --help')", err=True)
        sys.exit(2)
    except abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
