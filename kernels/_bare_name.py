"""Hand a bare-name import of a repo folder over to the package installed under that name.

The repo's top-level folders ``kernels/``, ``models/`` and ``converters/`` install as ``qserve.kernels``,
``qserve.models`` and ``qserve.converters``. Whenever the repo root is on ``sys.path`` (``python`` or
``python -m pytest`` started there, pytest's rootdir insertion, a Ray worker whose working directory is the
root), a bare ``import kernels`` would find the folder instead of, say, Hugging Face's ``kernels`` package
that transformers imports. Each folder's ``__init__`` calls :func:`hand_over` when it is imported under its
bare name, so the bare name resolves exactly as it would with the root off ``sys.path``: to the installed
package, or to ``ModuleNotFoundError``. Standard library only: this runs before anything else is imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, imported by mistake) with the package installed as ``name``.

    The import system returns whatever ``sys.modules[name]`` holds once the folder's ``__init__`` has run, so
    the caller must not run the rest of its body afterwards.
    """
    root = Path(init_file).resolve().parent.parent
    sys.modules.pop(f"{name}._bare_name", None)  # this helper, if it was imported under the bare name
    # "" on sys.path means the working directory.
    path = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
