"""`qserve plan ... --target-rps R --prompt-len L --output-len O [--replica-tps T]`: replicas by hand."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qserve.cli import app
from qserve.errors import QServeError
from qserve.planner import plan
from qserve.planner_replicas import plan_replicas, replicas_needed
from qserve.presets import find_gpu
from tests.test_planner import L8_LINEAR

# Llama-3.1-8B: every projection plus the lm_head (128256 x 4096) multiply each token
L8_DENSE = L8_LINEAR + 128256 * 4096  # 7_504_658_432


def test_replicas_needed_by_hand() -> None:
    # decode 2000 tok/s, prefill 20000 tok/s: 100 / 2000 + 1000 / 20000 = 0.1 s per request -> 10 req/s
    assert replicas_needed(10, 1000, 100, 2000.0, 20000.0) == pytest.approx((10.0, 1))
    assert replicas_needed(25, 1000, 100, 2000.0, 20000.0)[1] == 3
    assert replicas_needed(10.001, 1000, 100, 2000.0, 20000.0)[1] == 2
    # measured: 1000 output tok/s at 200 output tokens -> 5 req/s per replica; prefill is inside it
    assert replicas_needed(10, 500, 200, 1000.0) == pytest.approx((5.0, 2))
    assert replicas_needed(0.1, 500, 200, 1000.0)[1] == 1  # never fewer than one


def test_roofline_replicas() -> None:
    p = plan("llama-3.1-8b", gpu="H100-80GB", context=1200)
    r = plan_replicas(p, target_rps=80, prompt_len=1000, output_len=200)
    prefill = find_gpu("H100-80GB").flops / (2 * L8_DENSE + 2 * 32 * 4096 * 1000)
    assert p.decode is not None and r.source == "roofline"
    assert r.prefill_tokens_per_second == pytest.approx(prefill)  # 64,761 tok/s
    assert r.decode_tokens_per_second == p.decode.tokens_per_second
    per_replica = 1 / (200 / p.decode.tokens_per_second + 1000 / prefill)
    assert r.replica_requests_per_second == pytest.approx(per_replica)
    assert r.replicas == -(-80 // per_replica) == 3  # about 35 req/s each


def test_measured_replicas_and_errors() -> None:
    p = plan("demo", memory=1 << 30)
    r = plan_replicas(p, target_rps=20, prompt_len=100, output_len=50, replica_tps=800)
    assert (r.source, r.replica_requests_per_second, r.replicas) == ("measured", 16.0, 2)
    assert r.prefill_tokens_per_second is None
    with pytest.raises(QServeError, match="--replica-tps T"):
        plan_replicas(p, target_rps=20, prompt_len=100, output_len=50)  # no GPU: no roofline
    with pytest.raises(QServeError, match="must be positive"):
        plan_replicas(p, target_rps=0, prompt_len=100, output_len=50, replica_tps=800)
    with pytest.raises(QServeError, match="--replica-tps must be positive"):
        plan_replicas(p, target_rps=1, prompt_len=100, output_len=50, replica_tps=0)


def test_cli() -> None:
    base = ["plan", "llama-3.1-8b", "--gpu", "H100-80GB"]
    load = ["--target-rps", "80", "--prompt-len", "1000", "--output-len", "200"]
    r = CliRunner().invoke(app, [*base, *load, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["context"] == 1200  # each replica planned for the load's sequences
    assert set(out["replicas"]) == {
        "target_rps", "prompt_len", "output_len", "source", "decode_tokens_per_second",
        "prefill_tokens_per_second", "replica_requests_per_second", "replicas",
    }  # fmt: skip
    assert (out["replicas"]["replicas"], out["replicas"]["source"]) == (3, "roofline")
    r = CliRunner().invoke(app, [*base, *load, "--replica-tps", "4000"])
    assert r.exit_code == 0, r.output
    assert "replicas needed: 4 for 80 requests/s of 1000 prompt + 200 output tokens" in r.stdout  # 20 req/s
    assert "replicas" not in json.loads(CliRunner().invoke(app, [*base, "--json"]).stdout)
    for args, expect in [
        ([*base, "--target-rps", "80"], "together"),
        ([*base, "--replica-tps", "5"], "together"),
        (
            ["plan", "demo", "--memory", "1GiB", *load[:2], "--prompt-len", "100", "--output-len", "50"],
            "--replica-tps T",
        ),  # fmt: skip
        (["plan", "demo", "--memory", "1GiB", *load], "--context 1200 exceeds the model's 1024 positions"),
    ]:
        r = CliRunner().invoke(app, args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and expect in lines[0], (args, r.stderr)
