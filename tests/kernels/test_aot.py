"""The ahead-of-time kernel check (kernels/aot.py, kernels/aot_variants.py).

The variant list and real compiles run in fresh interpreters: other kernel tests decorate the kernels in
Triton's interpreter mode, which cannot compile. The compiles use the ptxas in triton's wheel, no GPU.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qserve.kernels import aot
from qserve.kernels.quant_matmul_configs import gemm_configs, gemv_configs, prune_configs

KERNELS_DIR = Path(aot.__file__).parent
pytest.importorskip("triton")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "qserve.kernels.aot", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _triton_kernels() -> set[str]:
    """Every @triton.jit function named *_kernel in kernels/ (the convention for launchable kernels)."""
    names = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.endswith("_kernel")
                and any("jit" in ast.unparse(d) for d in node.decorator_list)
            ):
                names.add(node.name)
    return names


# ----------------------------------------------------------------------------- parsing and verdicts

SM80_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_w8_gemm_kernel' for 'sm_80'
ptxas info    : Function properties for _w8_gemm_kernel
    152 bytes stack frame, 132 bytes spill stores, 88 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 152 bytes cumulative stack size, 456 bytes cmem[0]
"""


def test_parse_ptxas() -> None:
    assert aot.parse_ptxas(SM80_LOG) == (255, 220)
    clean = SM80_LOG.replace("132 bytes spill stores, 88", "0 bytes spill stores, 0").replace("255", "96")
    assert aot.parse_ptxas(clean) == (96, 0)
    assert aot.parse_ptxas("") == (None, None)


def test_verdict_limits() -> None:
    assert aot.verdict(80, 166_912, 128, 0) is None  # exactly the limit fits
    assert "over the sm_80 limit of 166912" in (aot.verdict(80, 166_913, 128, 0) or "")
    assert aot.verdict(90, 232_448, 128, 0) is None
    assert "over the sm_90 limit" in (aot.verdict(90, 232_449, 128, 0) or "")
    assert "spill" in (aot.verdict(90, 0, 255, 4) or "")
    assert "no register" in (aot.verdict(90, 0, None, None) or "")


def _result(ok: bool) -> aot.Result:
    return aot.Result("_k", {"BLOCK": 64}, "x:fp16", 90, ok, 0, 32, 0, None if ok else "boom", "v")


@pytest.mark.parametrize("ok", [True, False])
def test_main_exit_status_and_json(ok: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "run", lambda *a, **k: [_result(True), _result(ok)])
    out = tmp_path / "aot.json"
    assert aot.main(["--arch", "90", "--json", str(out)]) == (0 if ok else 1)
    rows = json.loads(out.read_text())
    keys = {"kernel", "config", "dtype", "arch", "ok", "shared", "registers", "spills", "error", "variant"}
    assert [set(r) for r in rows] == [keys, keys]
    assert [r["ok"] for r in rows] == [True, ok]


def _spilled(kernel: str, arch: int, spills: int = 40) -> aot.Result:
    error = aot.verdict(arch, 1024, 255, spills)
    return aot.Result(
        kernel, {"BLOCK_N": 64}, "q:fp32", arch, error is None, 1024, 255, spills, error, "decode"
    )


def test_baseline_accepts_only_listed_spills_and_goes_stale() -> None:
    known = [aot.asdict(_spilled("_decode_kernel", 80)), aot.asdict(_spilled("_prefill_kernel", 90))]
    known.append(aot.asdict(_spilled("_store_kv_kernel", 90)))  # not compiled in this run: not checked
    results = [
        _spilled("_decode_kernel", 80),
        _spilled("_decode_kernel", 90),
        _spilled("_prefill_kernel", 90, 0),
    ]
    broken = aot.Result(
        "_decode_kernel", {"BLOCK_N": 64}, "q:fp32", 80, False, None, None, None, "CompilationError", "x"
    )
    stale = aot.apply_baseline([*results, broken], known)
    assert [r.ok for r in results] == [True, False, True]  # listed spill accepted, an unlisted one not
    assert results[0].error is not None and results[0].error.startswith("known:")
    assert not broken.ok  # a compile error is never accepted
    assert stale == [aot.baseline_key(known[1])]  # the prefill variant no longer spills: remove it


def test_bad_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert aot.main(["--arch", "75"]) == 2
    assert aot.main(["--arch", "9x"]) == 2
    assert "error: --arch" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--arch", "90"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the variant list


def _union(path: str, ms: tuple[int, ...], groups: tuple[int, ...]) -> list[dict[str, int]]:
    base = gemv_configs() if path == "gemv" else gemm_configs()
    out: list[dict[str, int]] = []
    for g in groups:
        for m in ms:
            out += [c for c in prune_configs(base, path, m, g) if c not in out]
    return out


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("aot") / "list.json"
    res = _run("--list", "--json", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return list(json.loads(out.read_text()))


def test_every_kernel_is_listed(listed: list[dict[str, Any]]) -> None:
    names = _triton_kernels()
    assert (
        len(names) == 12
    )  # 4 matmul + split-K reduce + dequant + store + decode + reduce + prefill + MoE + bnb4
    assert {r["kernel"] for r in listed} == names


@pytest.mark.parametrize(
    "kernel", ["_w4_gemv_kernel", "_w8_gemv_kernel", "_w4_gemm_kernel", "_w8_gemm_kernel"]
)
def test_every_autotune_config_with_every_activation_dtype(kernel: str, listed: list[dict[str, Any]]) -> None:
    path = "gemv" if "gemv" in kernel else "gemm"
    int4 = kernel.startswith("_w4")
    groups = (32, 64, 128, 256) if int4 else (0,)
    keys = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages") + (
        ("BLOCK_M", "GROUP_M") if path == "gemm" else ()
    )
    for act in ("fp16", "bf16"):
        got = [r for r in listed if r["kernel"] == kernel and r["dtype"].startswith(f"x:{act} ")]
        if path == "gemv":  # BLOCK_M 1, 2, 4, each with what the register budget keeps
            for block_m, m in ((1, 1), (2, 2), (4, 3)):
                want = [{k: c[k] for k in keys} for c in _union(path, (m,), groups)]
                have = [{k: r["config"][k] for k in keys} for r in got if r["config"]["BLOCK_M"] == block_m]
                assert want and all(c in have for c in want), (act, block_m)
        else:
            want = [{k: c[k] for k in keys} for c in _union(path, (5, 16, 64, 256, 1023), groups)]
            have = [{k: r["config"][k] for k in keys} for r in got]
            assert len(want) >= len(gemm_configs()) and all(c in have for c in want), act
        scales = {r["dtype"].split(" s:")[1].split()[0] for r in got}
        outs = {r["dtype"].split(" c:")[1].split()[0] for r in got}
        assert scales == {"fp16", "bf16", "fp32"} and outs == {act, "fp32"}  # one K slice / split-K partials


def test_attention_variants(listed: list[dict[str, Any]]) -> None:
    dec = [r for r in listed if r["kernel"] == "_decode_kernel"]
    assert {(r["config"]["HEAD_DIM"], r["config"]["BITS"]) for r in dec} == {
        (d, b) for d in (64, 128, 256) for b in (0, 8, 4)
    }
    assert {r["dtype"].split()[0] for r in dec} == {"q:fp16", "q:bf16", "q:fp32"}
    assert {r["config"]["SPLIT"] for r in dec} == {True, False}
    wide = [r["config"] for r in dec if r["config"]["HEAD_DIM"] == 256]
    assert {(c["BLOCK_N"], c["num_warps"]) for c in wide} == {(32, 8)}  # default_config at head_dim 256
    store = [r for r in listed if r["kernel"] == "_store_kv_kernel"]
    assert {r["dtype"].split()[-1] for r in store} == {"cache:fp16", "cache:bf16", "cache:fp32", "cache:u8"}


def test_moe_variants_cover_the_scale_dtypes_the_converter_writes(listed: list[dict[str, Any]]) -> None:
    """Quantized experts of a bf16 / fp16 checkpoint carry bf16 / fp16 scales (float32 ones from a float32
    source): each is its own Triton specialisation, so each must be compiled."""
    moe = {tuple(r["dtype"].split()[:3]) for r in listed if r["kernel"] == "_fused_moe_kernel"}
    for act in ("fp16", "bf16"):
        assert (f"a:{act}", f"w:{act}", f"s:{act}") in moe  # float experts
        for w in ("i8", "u8"):  # int8, int4
            assert {(f"a:{act}", f"w:{w}", f"s:{s}") for s in (act, "fp32")} <= moe, (act, w)


# ----------------------------------------------------------------------------- real compiles


@pytest.mark.slow
def test_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    """Two small kernels, every listed variant, to cubins for both archs: shared, registers, no spills."""
    out = tmp_path / "aot.json"
    res = _run("--arch", "80,90", "--kernels", "_reduce_kernel,_splitk_reduce_kernel", "--json", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} == {"_reduce_kernel", "_splitk_reduce_kernel"}
    for r in rows:
        assert r["ok"] and r["error"] is None, r
        assert r["spills"] == 0 and 0 < r["registers"] <= 255 and 0 <= r["shared"] <= 232_448, r
    assert "0 failed" in res.stdout


_SPILL_AND_ERROR = """
import triton, triton.language as tl
from qserve.kernels import aot, aot_variants, quant_matmul_launch as qml
import torch

@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.dot(tl.load(x_ptr), 1))  # tl.dot of scalars: a compile error

with aot_variants.capture() as rec:
    x = torch.empty(16, 4096, dtype=torch.float16)
    cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    qml.matmul_int8_triton(x, torch.empty(1024, 4096, dtype=torch.int8), torch.empty(1024, dtype=torch.float16),
                           path="gemm", split_k=1, config=cfg)
    _broken_kernel[(1,)](torch.empty(64), BLOCK=64)
aot._LAUNCHES[:] = rec.launches
spill, broken = aot._compile((0, 80)), aot._compile((1, 90))
print(spill.ok, spill.spills, broken.ok, broken.error is not None and broken.shared is None)
"""


@pytest.mark.slow
def test_detects_a_spill_and_a_compile_error(tmp_path: Path) -> None:
    """A 128x256 int8 tile with 8 warps spills on sm_80 (so it is not an autotune config); a kernel that
    does not compile is a failed result, not a crash."""
    script = tmp_path / "spill_and_error.py"  # a file: triton.jit reads the kernel's source back
    script.write_text(_SPILL_AND_ERROR)
    env = _env() | {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ok, spills, broken_ok, errored = res.stdout.split()[-4:]
    assert ok == "False" and int(spills) > 0 and broken_ok == "False" and errored == "True"
