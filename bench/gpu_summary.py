"""The one JSON summary of a bench/gpu.sh run: sections, environment, every goal, the decode table.

    python bench/gpu_summary.py RESULTS_DIR name:rc:seconds ...   # writes RESULTS_DIR/summary.json

Reads what the sections left in RESULTS_DIR (kernels.json, attention.json, decode.json; a missing or
unreadable file is recorded as such) and prints the goals, one per line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, "missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"unreadable: {e}"


def goals(
    kernels: dict[str, Any] | None, attention: dict[str, Any] | None, decode: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Every goal as {source, goal, want, got, ok}; ok None where the run did not measure it."""
    out: list[dict[str, Any]] = []
    for shape, res in (kernels or {}).get("goals", {}).items():
        for name, (got, ok) in res.items():
            out.append(
                dict(source="kernels", goal=f"{name} ({shape})", got=got, ok=ok if got is not None else None)
            )
    for g in (attention or {}).get("goals", []):
        out.append(
            dict(
                source="attention",
                goal=f"{g['goal']} ({g['config']})",
                want=g["want"],
                got=g["got"],
                ok=g["ok"],
            )
        )
    for g in (decode or {}).get("goals", []):
        out.append(dict(source="decode", **g))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: gpu_summary.py RESULTS_DIR [name:rc:seconds ...]", file=sys.stderr)
        return 2
    out = Path(argv[0])
    sections = []
    for item in argv[1:]:
        name, rc, secs = item.rsplit(":", 2)
        sections.append(dict(name=name, rc=int(rc) if rc.lstrip("-").isdigit() else None,
                             seconds=int(secs) if secs.isdigit() else None))  # fmt: skip
    files = {name: _load(out / f"{name}.json") for name in ("kernels", "attention", "decode")}
    data = {name: d for name, (d, _) in files.items()}
    decode = data["decode"] or {}
    summary = dict(
        ok=all(s["rc"] == 0 for s in sections),
        sections=sections,
        files={name: why or "ok" for name, (_, why) in files.items()},
        env={name: (d or {}).get("env") for name, d in data.items()},
        goals=goals(data["kernels"], data["attention"], data["decode"]),
        decode=[{k: v for k, v in r.items()} for r in decode.get("rows", [])],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for g in summary["goals"]:
        got = g["got"] if not isinstance(g["got"], float) else round(g["got"], 3)
        verdict = "n/a" if g["ok"] is None else "PASS" if g["ok"] else "FAIL"
        print(f"   goal [{g['source']}] {g['goal']}: {got} {verdict}")
    print(f"   summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
