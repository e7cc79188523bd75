"""From the repo root, the top-level folders do not shadow installed packages of the same bare name.

`kernels/`, `models/` and `converters/` install as qserve.kernels, ...; with the root on sys.path (python or
pytest started there, Ray workers), a bare `import kernels` used to find the folder instead of Hugging Face's
`kernels` package that transformers imports. Each case runs in a fresh interpreter whose working directory is
the repo root, the way a user starts it (`python -c` puts the working directory first on sys.path). The
`--replicas` case is tests/cluster/test_ray_cluster.py::test_cli_replicas_session_affinity_beats_random_routing,
which starts `qserve serve demo --replicas 2` from the root.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(code: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bare_kernels_is_the_installed_package() -> None:
    installed = Path(str(distribution("kernels").locate_file("kernels/__init__.py"))).resolve()
    out = run_in_root("import kernels, qserve.kernels as q; print(kernels.__file__); print(q.__file__)")
    bare, ours = (Path(line).resolve() for line in out.split())
    assert bare == installed
    assert ours == ROOT / "kernels" / "__init__.py"


@pytest.mark.parametrize("name", ["models", "converters"])
def test_bare_name_with_nothing_installed_is_not_found(name: str) -> None:
    out = run_in_root(
        f"import qserve.{name}\n"
        f"try:\n    import {name}\nexcept ModuleNotFoundError as e:\n    print('not found', e.name)\n"
        f"else:\n    print({name}.__file__)\n"
    )
    assert out.strip() == f"not found {name}"


def test_llm_demo_from_the_root() -> None:
    out = run_in_root(
        "from qserve import LLM, SamplingParams\n"
        "from qserve.tokenizer import load_tokenizer\n"
        "from qserve.demo import MODEL_DIR\n"
        "tok = load_tokenizer(MODEL_DIR)\n"
        "llm = LLM('demo')\n"
        "out = llm.generate(['def fib(n):'], SamplingParams(max_tokens=4, temperature=0.0))[0]\n"
        "print(len(out.token_ids), type(tok).__name__)\n"
    )
    n, _ = out.split()
    assert n == "4"
