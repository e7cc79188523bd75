"""`qserve convert`: a float, AutoAWQ or GPTQ checkpoint -> qserve's quantized format, streaming.

Everything that can be checked is checked before writing (config, architecture, shard headers,
dtypes, group sizes); output goes to a temporary directory beside OUT that is renamed into place only
when complete, so a failure leaves nothing at OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qserve.config import ModelConfig, resolve_model_path
from qserve.converters.plan import Target, Unit, plan
from qserve.converters.report import REPORT_NAME, Report
from qserve.converters.rtn import check_settings, quantize_weight, weight_error
from qserve.converters.stream import ShardedWriter, SourceCheckpoint
from qserve.errors import QServeError
from qserve.kernels.packing import FORMAT_VERSION, QuantSpec

_NOT_COPIED = {"config.json", "model.safetensors.index.json", "quantize_config.json", REPORT_NAME}
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
Advance = Callable[[int, str], None]  # (bytes of source processed, what) -> None


def convert(
    src: str | Path,
    out: str | Path,
    weights: str | None = None,
    group_size: int | None = None,
    method: str | None = None,
    calib: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Convert ``src`` (a Hugging Face directory or ``demo``) into a qserve-format checkpoint at ``out``.

    Float sources are quantized (``weights`` int4 | int8, default int4; ``group_size`` 32 | 64 | 128,
    default 128; ``method`` rtn | awq, default rtn; ``calib``: text for awq). AutoAWQ-GEMM and GPTQ sources
    are re-packed bit-exactly and take no settings. Returns ``out``. Raises QServeError on bad input.
    """
    src_dir = resolve_model_path(src)
    out_dir = Path(out).expanduser().absolute()
    if out_dir.exists() and out_dir.resolve() == src_dir.resolve():
        raise QServeError("OUT must differ from SRC")
    if out_dir.exists() and not force:
        raise QServeError(f"{out_dir} already exists (use --force to replace it)")
    raw = _read_config(src_dir)
    cfg = ModelConfig.from_dict(raw)  # unsupported architectures raise here
    try:
        source = QuantSpec.from_config(raw.get("quantization_config"))
    except ValueError as e:
        raise QServeError(f"cannot convert {src_dir}: {e}") from None
    target, qconfig = _target(source, weights, group_size, method)
    if target.weights == "nf4":
        from qserve.converters.bnb import bnb_config

        if cfg.moe is not None:
            raise QServeError(
                f"--weights nf4 does not support MoE models ({cfg.architecture}): use int4 or int8"
            )
        qconfig = bnb_config(cfg.dtype)
    ckpt = SourceCheckpoint(src_dir)
    if target.source is None and qconfig.get("method") == "awq" and cfg.moe is not None:
        from qserve.converters.awq_moe import check_moe_layout

        check_moe_layout(ckpt)
    units = plan(ckpt, target)
    if not any(u.kind != "copy" for u in units):
        raise QServeError(f"no decoder linear layers found in {src_dir}")
    calib_text = (
        _calibration_text(calib) if target.source is None and qconfig.get("method") == "awq" else None
    )
    settings = {**qconfig, "source": str(src_dir)}
    report = Report(settings)
    with _staging(out_dir, force) as tmp:
        writer = ShardedWriter(tmp, [o for u in units for o in u.outputs], max_shard_bytes)
        try:
            with _progress(sum(u.source_bytes for u in units), progress) as advance:
                if calib_text is not None:
                    from qserve.converters.awq import run_awq

                    run_awq(src_dir, cfg, ckpt, units, target, writer, report, calib_text, advance)
                else:
                    for unit in units:
                        tensors = {s: ckpt.read(n) for s, n in unit.inputs.items()}
                        write_unit(unit, process_unit(unit, tensors, target, report), writer)
                        advance(unit.source_bytes, unit.module)
            writer.close()
        finally:
            writer.abort()
        raw["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for f in src_dir.iterdir():
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_NOT_COPIED_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        report.write(tmp)
    return out_dir


def process_unit(
    unit: Unit, tensors: dict[str, torch.Tensor], target: Target, report: Report
) -> dict[str, torch.Tensor]:
    """Output tensors of one unit, by name; quantized linears add an entry to ``report``."""
    if unit.kind == "copy":
        return {unit.module: tensors[""]}
    if unit.kind == "import":
        assert target.source is not None
        try:
            qw = target.source.to_qserve(tensors)
        except ValueError as e:
            raise QServeError(f"{unit.module}: {e}") from None
        entry: dict[str, Any] = {"imported_from": target.source.source}
    elif target.weights == "nf4":
        from qserve.converters.bnb import quantize_nf4

        w = tensors["weight"]
        outputs, stats = quantize_nf4(unit.module, w)
        n, k = w.shape
        nbytes = sum(t.numel() * t.element_size() for t in outputs.values())
        report.add(unit.module, {"shape": [n, k], "bytes": nbytes, "bf16_bytes": 2 * n * k, **stats})
        return outputs
    else:
        w = tensors["weight"]  # the source dtype, or float32 after activation-aware scaling
        scale_dtype = next(o.dtype for o in unit.outputs if o.name.endswith(".scales"))
        qw = quantize_weight(w, target.weights, target.group_size, scale_dtype)
        entry = weight_error(w, qw)
    n, k = qw.out_features, qw.in_features
    report.add(unit.module, {"shape": [n, k], "bytes": qw.nbytes, "bf16_bytes": 2 * n * k, **entry})
    return {f"{unit.module}.{s}": t for s, t in qw.tensors().items()}


def write_unit(unit: Unit, outputs: dict[str, torch.Tensor], writer: ShardedWriter) -> None:
    for o in unit.outputs:
        writer.write(o.name, outputs[o.name])


def _read_config(src_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((src_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise QServeError(f"{src_dir / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise QServeError(f"{src_dir / 'config.json'} is not a JSON object")
    legacy = (
        src_dir / "quantize_config.json"
    )  # AutoGPTQ / AutoAWQ once wrote their settings beside config.json
    if "quantization_config" not in raw and legacy.is_file():
        try:
            q = json.loads(legacy.read_text())
        except json.JSONDecodeError as e:
            raise QServeError(f"{legacy} is not valid JSON: {e}") from None
        q.setdefault("quant_method", "awq" if "w_bit" in q or "zero_point" in q else "gptq")
        raw["quantization_config"] = q
    return raw


def _target(
    source: QuantSpec | None, weights: str | None, group_size: int | None, method: str | None
) -> tuple[Target, dict[str, Any]]:
    base: dict[str, Any] = {"quant_method": "qserve", "format_version": FORMAT_VERSION}
    if source is not None:
        if source.source == "qserve":
            raise QServeError("SRC is already in qserve's quantized format")
        if source.source == "bnb":  # 4-bit codebooks have no int4 form; its float weights are gone
            raise QServeError(
                f"SRC is a bitsandbytes {source.weights} checkpoint: qserve serves it as it is (qserve serve SRC); "
                "to quantize differently, convert the float checkpoint"
            )
        if weights not in (None, "int4") or group_size not in (None, source.group_size) or method is not None:
            raise QServeError(
                f"SRC is a {source.source} checkpoint (int4, group size {source.group_size}): it is re-packed "
                "as is, so --weights/--group-size/--method do not apply"
            )
        qconfig = {
            **base,
            "weights": "int4",
            "group_size": source.group_size,
            "method": source.method,
            "zero_point": True,
            "sym": source.sym,
            "imported_from": source.extra,
        }
        return Target("int4", source.group_size, source), qconfig
    weights, method = weights or "int4", method or "rtn"
    if weights == "nf4":
        if group_size is not None or method not in ("rtn", None):
            raise QServeError(
                "--weights nf4 quantizes by bitsandbytes (blocks of 64): --group-size/--method do not apply"
            )
        from qserve.converters.bnb import BLOCKSIZE

        return Target("nf4", BLOCKSIZE), {}  # the caller fills in transformers' BitsAndBytesConfig
    group = -1 if weights == "int8" else (group_size or 128)
    check_settings(weights, group)
    if method not in ("rtn", "awq"):
        raise QServeError(f"unknown --method {method!r}: use rtn or awq")
    qconfig = {
        **base,
        "weights": weights,
        "group_size": group,
        "method": method,
        "zero_point": weights == "int4",
        "sym": weights == "int8",
        "modules_to_not_convert": ["lm_head"],
    }
    return Target(weights, group), qconfig


def _calibration_text(calib: str | Path | None) -> str:
    if calib is None:
        from qserve.demo import CALIB_TEXT

        if not CALIB_TEXT.is_file():
            raise QServeError("--method awq needs calibration text: give --calib FILE")
        calib = CALIB_TEXT
    path = Path(calib).expanduser()
    if not path.is_file():
        raise QServeError(f"calibration file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QServeError(f"calibration file {path} is not UTF-8 text") from None
    if len(text.strip()) < 16:
        raise QServeError(f"calibration file {path} is empty")
    return text


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def _staging(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside ``out_dir``, renamed to it on success and removed on failure."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; OUT gets the mode mkdir would give it
    except OSError as e:
        raise QServeError(
            f"OUT is not writable: cannot create a directory beside {out_dir}: {e.strerror}"
        ) from None
    try:
        yield tmp
        for f in tmp.rglob("*"):  # safetensors writes its files 0600
            if f.is_file():
                f.chmod(0o666 & ~_umask())
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            if not force:
                raise QServeError(f"{out_dir} already exists (use --force to replace it)")
            old = out_dir.parent / f"{tmp.name}.old"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise QServeError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Advance]:
    if not enabled:
        yield lambda n, what: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:<48}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("converting", total=total)

        def advance(n: int, what: str) -> None:
            bar.update(task, advance=n, description=what[-48:])

        yield advance
