"""`qserve convert SRC OUT`: the command function, registered by qserve/cli.py as

    app.command("convert")(convert_command)

Bad input ends as one line on stderr (``error: ...``) and exit code 2, with nothing left at OUT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qserve.errors import QServeError


def convert_command(
    src: Annotated[
        str, typer.Argument(help="Hugging Face model directory (float, AutoAWQ-GEMM or GPTQ), or 'demo'.")
    ],
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist unless --force).")],
    weights: Annotated[
        str | None,
        typer.Option(
            help="int4 (group-wise, zero points), int8 (per channel) or nf4 (bitsandbytes, written as "
            "transformers saves BitsAndBytesConfig(load_in_4bit)). Default: int4."
        ),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="int4 group size: 32, 64 or 128. Default: 128.")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="rtn (round-to-nearest) or awq (activation-aware). Default: rtn.")
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option(help="Calibration text for --method awq. Default: the demo model's calib.txt."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Quantize a checkpoint to int4/int8 (or re-pack an AWQ/GPTQ one) into qserve's format."""
    from qserve.converters import convert
    from qserve.converters.report import REPORT_NAME

    try:
        out_dir = convert(src, out, weights, group_size, method, calib, force=force, progress=progress)
    except QServeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    summary = json.loads((out_dir / REPORT_NAME).read_text())["summary"]
    settings = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    if settings["quant_method"] == "bitsandbytes":  # --weights nf4 writes transformers' BitsAndBytesConfig
        what, how = settings["bnb_4bit_quant_type"], "bitsandbytes"
    else:
        what = settings["weights"] + (f" g{settings['group_size']}" if settings["weights"] == "int4" else "")
        how = settings["method"]
    line = f"wrote {out_dir} ({what}, {how}): {summary['linear_layers']} linear layers"
    if summary.get("size_vs_bf16"):
        line += f", {summary['size_vs_bf16']:.3f}x their bf16 bytes"
    if "mean_rel_error" in summary:
        line += f", mean relative weight error {summary['mean_rel_error']:.4f}"
    typer.echo(line)
