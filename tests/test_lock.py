"""The lock files in requirements/ still satisfy pyproject's ranges (else: `make lock`)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# A pin line: `name==version ; marker \` followed by `--hash=sha256:...` lines.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*(.+?))?\s*\\?$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None  # a universal lock forks some packages by Python version or platform
    hashes: int


def read_lock(path: Path) -> list[Pin]:
    pins: list[Pin] = []
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            marker = Marker(m.group(3)) if m.group(3) else None
            pins.append(Pin(canonicalize_name(m.group(1)), Version(m.group(2)), marker, 0))
        elif line.strip().startswith("--hash=sha256:") and pins:
            pins[-1] = replace(pins[-1], hashes=pins[-1].hashes + 1)
    return pins


def pins_here(path: Path) -> dict[str, Version]:
    """name -> version, for this interpreter and platform (each package once)."""
    here: dict[str, Version] = {}
    for pin in read_lock(path):
        if pin.marker is None or pin.marker.evaluate():
            assert pin.name not in here, f"{path.name}: {pin.name} pinned twice for this platform"
            here[pin.name] = pin.version
    return here


def requirements(extra: str | None) -> list[Requirement]:
    """pyproject's dependencies plus an extra's, self-references (`qserve[server]`) expanded."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    todo, seen = [extra] if extra else [], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for spec in PYPROJECT["project"]["optional-dependencies"][name]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == "qserve":
                todo += [e for e in req.extras if e not in seen]
            else:
                reqs.append(req)
    return reqs


def applies(req: Requirement) -> bool:
    if req.marker is None:
        return True
    return req.marker.evaluate({**default_environment(), "extra": ""})


def torch_pin() -> Version:
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M)
    assert m, "the Makefile pins torch as `TORCH ?= torch==X`"
    return Version(m.group(1))


@pytest.mark.parametrize(("lock", "extra"), [("dev.txt", "dev"), ("serve.txt", "server")])
def test_lock_satisfies_pyproject(lock: str, extra: str) -> None:
    pins = pins_here(ROOT / "requirements" / lock)
    for req in requirements(extra):
        name = canonicalize_name(req.name)
        if name == "torch":  # installed first by the Makefile, in the machine's build (not locked)
            assert req.specifier.contains(torch_pin()), f"Makefile's torch {torch_pin()} is outside {req}"
            continue
        if not applies(req):
            continue
        assert name in pins, f"{req} is missing from requirements/{lock}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside pyproject's {req}: run `make lock`"
        )


@pytest.mark.parametrize("lock", ["dev.txt", "serve.txt", "pip.txt"])
def test_every_pin_has_hashes(lock: str) -> None:
    pins = read_lock(ROOT / "requirements" / lock)
    assert pins
    assert "torch" not in {p.name for p in pins}
    assert [p.name for p in pins if p.hashes == 0] == []


def test_serve_lock_is_dev_lock_subset() -> None:
    # `make test` after `make serve` (or the reverse) must not move any version.
    dev = {(p.name, p.version) for p in read_lock(ROOT / "requirements" / "dev.txt")}
    serve = {(p.name, p.version) for p in read_lock(ROOT / "requirements" / "serve.txt")}
    assert serve - dev == set()


def test_lock_resolves_against_the_makefile_torch() -> None:
    override = (ROOT / "requirements" / "torch-cpu.txt").read_text()
    m = re.search(r"^torch==(\S+)$", override, re.M)
    assert m and Version(m.group(1)).public == str(torch_pin())


def test_checker_flags_a_stale_lock(tmp_path: Path) -> None:
    # The check itself can fail: a lock that pins a version outside the range.
    stale = tmp_path / "stale.txt"
    stale.write_text("transformers==4.0.0 \\\n    --hash=sha256:00\n")
    pins = pins_here(stale)
    req = next(r for r in requirements(None) if r.name == "transformers")
    assert not req.specifier.contains(pins["transformers"])
