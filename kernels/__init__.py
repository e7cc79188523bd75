"""Compute kernels: Triton kernels for CUDA, each beside its pure-torch reference and CPU path.

A leaf package: it imports only torch (and triton, guarded, by the modules that hold Triton kernels).
``import qserve.kernels`` itself imports nothing; ``qserve.kernels.quant_matmul`` (the function) loads its
module on first use.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if __name__ != "qserve.kernels":  # imported as bare `kernels` because the repo root is on sys.path
    # relative: works even where qserve itself is not installed (another venv with the repo on PYTHONPATH)
    from ._bare_name import hand_over

    hand_over(__name__, __file__)

if TYPE_CHECKING:
    from qserve.kernels.quant_matmul import quant_matmul

__all__ = ["quant_matmul"]


def __getattr__(name: str) -> Any:
    if name == "quant_matmul":
        from qserve.kernels.quant_matmul import quant_matmul

        return quant_matmul
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    # Importing the submodule qserve.kernels.quant_matmul makes Python bind the *module* to this package's
    # attribute of the same name, which would shadow the function. Bind the function instead, so
    # `from qserve.kernels import quant_matmul` gives the op whatever was imported first (the module
    # itself stays reachable as `from qserve.kernels.quant_matmul import ...`).
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "quant_matmul" and isinstance(value, types.ModuleType):
            value = value.quant_matmul
        super().__setattr__(name, value)


if __name__ == "qserve.kernels":
    sys.modules[__name__].__class__ = _Package
