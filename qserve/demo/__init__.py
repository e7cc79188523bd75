"""The bundled demo model: a small Llama trained by qserve on Python standard-library source.

`MODEL_DIR` is a standard Hugging Face directory; `HELDOUT_TEXT` is held-out evaluation text and
`CALIB_TEXT` calibration text for activation-aware quantization. The word ``demo`` names this model
wherever a MODEL is accepted (see :func:`qserve.config.resolve_model_path`).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
MODEL_DIR: Path = _HERE / "model"
HELDOUT_TEXT: Path = _HERE / "data" / "heldout.txt"
CALIB_TEXT: Path = _HERE / "data" / "calib.txt"


def heldout_prompts(n: int) -> list[str]:
    """``n`` held-out lines longer than 20 characters, evenly spaced through `HELDOUT_TEXT` (agreement tests)."""
    lines = [ln for ln in HELDOUT_TEXT.read_text().splitlines() if len(ln.strip()) > 20]
    return lines[:: max(1, len(lines) // n)][:n]
