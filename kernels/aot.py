"""Ahead-of-time check of every Triton kernel: compile each launch variant to a cubin, no GPU needed.

    python -m qserve.kernels.aot --arch 80,90 [--json FILE] [--full] [--jobs N] [--kernels NAME,...]

Each launch of :func:`qserve.kernels.aot_variants.launches` (every kernel in ``kernels/``, under every
autotune config, for every dtype the runtime launches it with) is specialised exactly as a launch would
(triton's own binder), then compiled by ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with the
ptxas bundled in triton's wheel: no driver, nothing launched or warmed up. Per variant it reports the
shared memory (``metadata.shared``), and the registers and spills from ptxas ``-v`` (triton's ptxas log;
registers cross-checked with the bundled ``cuobjdump --dump-resource-usage``). A fresh triton cache per
run makes ptxas run, and report, for every variant.

Exit status 1 on a compile error, shared memory over the arch's per-block limit, or any spill; 2 on bad
arguments. ``--json FILE`` writes a list of ``{kernel, config, dtype, arch, ok, shared, registers, spills,
error, variant}``. Needs triton with its NVIDIA backend; run it in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}  # bytes per block (opt-in maximum)
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP_REGS = re.compile(r"REG:(\d+)")
_TRITON_NAMES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.uint8": "u8",
                 "torch.int8": "i8", "torch.int32": "i32", "torch.int64": "i64"}  # fmt: skip


@dataclass
class Result:
    """One compiled variant; ``ok`` is False on an error, shared memory over the limit, or a spill."""

    kernel: str
    config: dict[str, Any]
    dtype: str
    arch: int
    ok: bool
    shared: int | None
    registers: int | None
    spills: int | None
    error: str | None
    variant: str


def parse_ptxas(log: str) -> tuple[int | None, int | None]:
    """(registers, spilled bytes: stores + loads) from a ``ptxas -v`` log of one kernel; None if absent."""
    regs = _REGS.findall(log)
    spills = _SPILLS.findall(log)
    r = int(regs[-1]) if regs else None
    s = sum(int(a) + int(b) for a, b in spills) if spills else None
    return r, s


def verdict(arch: int, shared: int | None, registers: int | None, spills: int | None) -> str | None:
    """Why a compiled variant fails the check, or None when it passes."""
    limit = SHARED_LIMIT.get(arch)
    if shared is not None and limit is not None and shared > limit:
        return f"shared memory {shared} B over the sm_{arch} limit of {limit} B per block"
    if registers is None or spills is None:
        return "ptxas reported no register / spill counts"
    if spills:
        return f"{spills} bytes of register spills (stores + loads)"
    return None


def _describe(signature: dict[str, str], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """("x:bf16 s:fp16 ...": the pointers' element types, the meta-parameters as JSON values)."""
    dtype = " ".join(f"{n.removesuffix('_ptr')}:{t.lstrip('*')}" for n, t in signature.items() if t[0] == "*")
    config = {
        k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in kwargs.items()
    }
    return dtype, config


def _cuobjdump_regs(cubin: bytes) -> int | None:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True)
    found = _CUOBJDUMP_REGS.findall(res.stdout)
    return int(found[-1]) if found else None


# ----------------------------------------------------------------------------- compiling

_LAUNCHES: list[Any] = []  # set in the parent before the worker pool forks


def _specialise(launch: Any, arch: int) -> tuple[Any, Any, dict[str, Any]]:
    """(ASTSource, target, options) exactly as ``JITFunction.run`` would build them for this launch."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__


def _compile(task: tuple[int, int]) -> Result:
    import triton

    index, arch = task
    launch = _LAUNCHES[index]
    src, target, options = _specialise(launch, arch)
    dtype, config = _describe(src.signature, launch.kwargs)
    shared = registers = spills = None
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(src, target=target, options=options)
        shared = int(kernel.metadata.shared)
        registers, spills = parse_ptxas(log.getvalue())
        registers = _cuobjdump_regs(kernel.asm["cubin"]) or registers
        error = verdict(arch, shared, registers, spills)
    except Exception as e:  # a compile error is a result, not a crash
        error = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    return Result(
        launch.name, config, dtype, arch, error is None, shared, registers, spills, error, launch.label
    )


def _key(task: tuple[int, int]) -> str:
    src, target, options = _specialise(_LAUNCHES[task[0]], task[1])
    return repr((src.hash(), target, sorted(options.items())))


def run(
    archs: list[int], full: bool = False, jobs: int | None = None, kernels: set[str] | None = None
) -> list[Result]:
    """Compile every distinct variant for every arch (``jobs`` worker processes) and return the results."""
    from qserve.kernels.aot_variants import launches

    _LAUNCHES[:] = [x for x in launches(full) if kernels is None or x.name in kernels]
    tasks, seen = [], set()
    for i in range(len(_LAUNCHES)):
        for arch in archs:
            key = _key((i, arch))
            if key not in seen:  # launches that specialise the same compile once
                seen.add(key)
                tasks.append((i, arch))
    jobs = jobs or os.cpu_count() or 1
    print(f"aot: compiling {len(tasks)} variants on {jobs} processes", file=sys.stderr, flush=True)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        done: Iterable[Result]
        if jobs == 1:
            done = map(_compile, tasks)
        else:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            done = pool.imap(_compile, tasks, chunksize=1)
        for r in done:
            results.append(r)
            if len(results) % 100 == 0 or not r.ok:
                state = "ok" if r.ok else f"FAIL {r.kernel} sm_{r.arch}: {r.error}"
                print(f"aot: {len(results)}/{len(tasks)} ({state})", file=sys.stderr, flush=True)
    return results


def baseline_key(r: Result | dict[str, Any]) -> str:
    d = asdict(r) if isinstance(r, Result) else r
    return json.dumps([d["kernel"], d["arch"], d["dtype"], d["config"], d["variant"]], sort_keys=True)


def apply_baseline(results: list[Result], known: list[dict[str, Any]]) -> list[str]:
    """Accept the spills ``known`` lists (a ratchet while they are being fixed); return what is stale.

    Only a spill is ever accepted, never a compile error or shared memory over the limit. A listed variant
    that no longer spills (or no longer exists) is stale: the baseline must shrink with every fix.
    """
    compiled = {(r.kernel, r.arch) for r in results}  # a --kernels / --arch subset checks its own entries
    keys = {baseline_key(k) for k in known if (k["kernel"], k["arch"]) in compiled}
    seen = set()
    for r in results:
        k = baseline_key(r)
        if k in keys and r.spills and r.error and "spills" in r.error:
            seen.add(k)
            r.ok, r.error = True, f"known: {r.error} (listed in the baseline)"
    return sorted(keys - seen)


def summary(results: list[Result]) -> str:
    lines = []
    by: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        by.setdefault((r.kernel, r.arch), []).append(r)
    for (name, arch), rs in sorted(by.items()):
        good = [r for r in rs if r.ok]
        regs = max((r.registers or 0 for r in rs), default=0)
        shared = max((r.shared or 0 for r in rs), default=0)
        lines.append(f"  {name:24s} sm_{arch}: {len(good):4d}/{len(rs):<4d} ok, max {regs:3d} registers, "
                     f"max shared {shared:6d} B")  # fmt: skip
    for r in results:
        if not r.ok:
            lines.append(f"FAIL {r.kernel} sm_{r.arch} [{r.variant}] {r.dtype} {r.config}: {r.error}")
    return "\n".join(lines)


def _list(full: bool, kernels: set[str] | None, out: Path | None) -> int:
    from qserve.kernels.aot_variants import launches

    rows = []
    for x in launches(full):
        if kernels is None or x.name in kernels:
            sig = {p.name: "*" + _TRITON_NAMES.get(str(a.dtype), str(a.dtype))
                   for p, a in zip(x.fn.params, x.args, strict=False) if hasattr(a, "dtype")}  # fmt: skip
            dtype, config = _describe(sig, x.kwargs)
            rows.append(dict(kernel=x.name, config=config, dtype=dtype, variant=x.label))
    for r in rows:
        print(f"{r['kernel']:24s} [{r['variant']}] {r['dtype']} {r['config']}")
    if out:
        out.write_text(json.dumps(rows, indent=1))
    print(f"aot: {len(rows)} launch variants (before de-duplication, per arch)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qserve.kernels.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--json", type=Path, default=None, help="write every variant's result to this file")
    ap.add_argument("--full", action="store_true", help="the whole cross product of shapes and dtypes")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core)")
    ap.add_argument("--kernels", default=None, help="only these kernels (names, comma-separated)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="JSON list of known spilling variants to accept (make check's ratchet); others fail")  # fmt: skip
    ap.add_argument(
        "--list", action="store_true", help="list the launch variants (to --json too); compile nothing"
    )
    args = ap.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        archs = []
    if not archs or any(a not in SHARED_LIMIT for a in archs):
        print(f"error: --arch takes a comma-separated list of {sorted(SHARED_LIMIT)}, got {args.arch!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        print(
            "error: unset TRITON_INTERPRET: the ahead-of-time check compiles, it never interprets",
            file=sys.stderr,
        )
        return 2
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        print("error: the ahead-of-time check needs triton with its NVIDIA backend", file=sys.stderr)
        return 2
    kernels = set(args.kernels.split(",")) if args.kernels else None
    if args.list:
        return _list(args.full, kernels, args.json)
    saved = {
        k: os.environ.get(k)
        for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_DEFAULT_FP_FUSION", "TRITON_CACHE_DIR")
    }
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences triton's warning
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="qserve-aot-") as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # fresh: ptxas runs (and reports) for every variant
            results = run(archs, args.full, args.jobs, kernels)
    finally:  # called as a function (tests), leave the environment as it was
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    stale: list[str] = []
    if args.baseline:
        stale = apply_baseline(results, json.loads(args.baseline.read_text()))
        for k in stale:
            print(f"FAIL stale baseline entry (fixed or gone: remove it from {args.baseline}): {k}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = [r for r in results if not r.ok]
    print(summary(results))
    print(f"aot: {len(results)} variants for sm_{', sm_'.join(map(str, archs))}, {len(bad)} failed, "
          f"{time.time() - t0:.0f} s")  # fmt: skip
    return 1 if bad or stale or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
