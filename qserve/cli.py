"""The `qserve` command line: a thin typer layer over the engine, converter, planner and server.

Every error a user can cause ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
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
KvOpt = Annotated[str, typer.Option("--kv-cache-dtype", help="KV cache dtype: auto, fp16, bf16, fp32.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


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
    from qserve.engine.llm import LLM
    from qserve.types import SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    llm = LLM(model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_num_seqs=1)
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
) -> None:
    """Perplexity of MODEL on a text file, through qserve's own runtime."""
    from qserve.engine.llm import LLM
    from qserve.eval import perplexity

    if not data.is_file():
        raise QServeError(f"data file not found: {data}")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QServeError(f"{data} is not UTF-8 text") from None
    llm = LLM(model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=4096)
    res = perplexity(llm, text, context=context, max_tokens=max_eval_tokens)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
