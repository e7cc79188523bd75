"""The per-layer error report written beside a converted checkpoint as ``quant_report.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_NAME = "quant_report.json"


@dataclass
class Report:
    """Accumulates one entry per quantized linear, then a summary.

    Entry fields: shape [N, K]; bytes (quantized) and bf16_bytes (2 N K); rel_error
    (||W - dequant(Q)||_F / ||W||_F) and max_abs_error for float sources; for --method awq also
    rtn_output_error / awq_output_error (relative error of X W^T on calibration activations) and alpha.
    """

    settings: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, module: str, entry: dict[str, Any]) -> None:
        self.layers.setdefault(module, {}).update(entry)

    def summary(self) -> dict[str, Any]:
        entries = list(self.layers.values())
        out: dict[str, Any] = {"linear_layers": len(entries)}
        qbytes = sum(e.get("bytes", 0) for e in entries)
        bf16 = sum(e.get("bf16_bytes", 0) for e in entries)
        out["linear_bytes"] = qbytes
        out["linear_bf16_bytes"] = bf16
        out["size_vs_bf16"] = round(qbytes / bf16, 4) if bf16 else None
        for key in ("rel_error", "rtn_output_error", "awq_output_error"):
            vals = [float(e[key]) for e in entries if key in e and math.isfinite(float(e[key]))]
            if vals:
                out[f"mean_{key}"] = sum(vals) / len(vals)
                out[f"max_{key}"] = max(vals)
        return out

    def write(self, out_dir: Path) -> Path:
        path = out_dir / REPORT_NAME
        doc = {"settings": self.settings, "summary": self.summary(), "layers": self.layers}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path
