"""`qserve bench URL`: the command function, registered by qserve/cli.py as

    app.command("bench")(user_errors(bench_command))

A bad flag or an unreachable server is a QServeError: one line on stderr and exit code 2. A run in which
no request completed exits 1 after its report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from qserve.bench.config import DEFAULT_REQUESTS, BenchConfig, parse_range


def bench_command(
    url: Annotated[str, typer.Argument(help="Server base URL, e.g. http://127.0.0.1:8000.")],
    workload: Annotated[
        str, typer.Option(help="steady (Poisson), bursty (on/off), closed (fixed concurrency) or agent.")
    ] = "steady",
    concurrency: Annotated[
        int, typer.Option(help="Most requests in flight (closed: exactly; agent: sessions).")
    ] = 32,
    requests: Annotated[
        int | None,
        typer.Option(
            help=f"Requests to send (agent: turns). Default {DEFAULT_REQUESTS}, none with --duration."
        ),
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop sending after this many seconds.")] = None,
    rate: Annotated[
        float, typer.Option(help="Arrivals per second (agent: sessions); inf = all at once.")
    ] = 8.0,
    burst_on: Annotated[float, typer.Option(help="bursty: seconds of arrivals at --rate.")] = 2.0,
    burst_off: Annotated[float, typer.Option(help="bursty: seconds of silence between bursts.")] = 2.0,
    prompt_len: Annotated[
        str, typer.Option(help="Prompt tokens: N, LO:HI (uniform) or normal:MEAN,STD.")
    ] = "64:256",
    output_len: Annotated[str, typer.Option(help="Output tokens per request (same forms).")] = "64",
    user_len: Annotated[str, typer.Option(help="agent: new user tokens per later turn.")] = "16:64",
    turns: Annotated[int, typer.Option(help="agent: turns per session.")] = 4,
    think_time: Annotated[
        float, typer.Option(help="agent: seconds between a turn's answer and the next turn.")
    ] = 1.0,
    dataset: Annotated[
        Path | None, typer.Option(help='JSONL lines {"prompt": str | [ids], "output_len": int}.')
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: first of /v1/models).")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="QSERVE_API_KEY", help="Send 'Authorization: Bearer KEY'.")
    ] = None,
    endpoint: Annotated[str, typer.Option(help="completions (token-id prompts) or chat.")] = "completions",
    seed: Annotated[int, typer.Option(help="Seed for prompts and arrival times.")] = 0,
    vocab_range: Annotated[str, typer.Option(help="Synthetic token ids are drawn from [LO, HI).")] = "1:256",
    timeout: Annotated[float, typer.Option(help="Seconds before a request counts as a timeout.")] = 600.0,
    metrics_interval: Annotated[float, typer.Option(help="Seconds between /metrics samples.")] = 0.5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="PNG: latency against throughput, utilization over time.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Live progress display on stderr.")] = True,
) -> None:
    """Drive an OpenAI-compatible server with a workload and report throughput, latency and utilization."""
    from qserve.bench.report import plot_reports, print_report
    from qserve.bench.runner import run_bench

    cfg = BenchConfig(
        url=url,
        workload=workload,
        concurrency=concurrency,
        requests=requests,
        duration=duration,
        rate=rate,
        burst_on=burst_on,
        burst_off=burst_off,
        prompt_len=prompt_len,
        output_len=output_len,
        user_len=user_len,
        turns=turns,
        think_time=think_time,
        dataset=dataset,
        model=model,
        api_key=api_key,
        endpoint=endpoint,
        seed=seed,
        vocab_range=parse_range(vocab_range),
        timeout=timeout,
        metrics_interval=metrics_interval,
        progress=progress,
    )
    report = run_bench(cfg, Console(stderr=True))
    if json_out is not None:
        report.write_json(json_out)
    if plot is not None:
        plot_reports([(url, report)], plot)
    print_report(report, Console())
    if report.completed == 0:
        typer.echo("error: no request completed", err=True)
        raise typer.Exit(1)
