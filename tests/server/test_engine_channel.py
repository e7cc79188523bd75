"""The engine link: two one-way pipes and plain pickle, each end sees the other's messages in order and
EOF when the other end is gone."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from qserve.server.engine_core import Channel, StepUpdate, Update
from qserve.types import TokenLogprob


def pair() -> tuple[Channel, Channel]:
    a_rx, b_tx = mp.Pipe(duplex=False)
    b_rx, a_tx = mp.Pipe(duplex=False)
    return Channel(a_rx, a_tx), Channel(b_rx, b_tx)


def _echo(ch: Channel) -> None:
    while (msg := ch.recv()) is not None:
        ch.send(("echo", msg))
    ch.close()


def step_message(i: int) -> tuple[str, StepUpdate]:
    lp = [TokenLogprob(token_id=7, logprob=-0.25, top={7: -0.25, 9: -1.5})] if i % 2 else None
    u = Update(f"cmpl-{i}-0", f" tok{i}", [i, i + 1], lp, i + 2, i == 3, "stop" if i == 3 else None)
    return "step", StepUpdate(updates=[u], applied_adds=i, waiting=4 - i, metrics={"batch_size": i})


def test_messages_arrive_in_order_both_ways() -> None:
    a, b = pair()
    assert not a.poll() and not b.poll()
    for i in range(4):
        b.send(step_message(i))
    a.send(("abort", ["x", "y"]))
    assert b.poll() and b.recv() == ("abort", ["x", "y"])
    assert not b.poll()
    got = [a.recv() for _ in range(4)]
    assert got == [step_message(i) for i in range(4)]
    assert got[1][1].updates[0].logprobs[0].top == {7: -0.25, 9: -1.5}
    assert not a.poll()


def test_the_other_end_closing_is_eof() -> None:
    a, b = pair()
    b.send(("step", StepUpdate()))
    b.close()
    assert a.recv() == ("step", StepUpdate())  # what was sent before the close still arrives
    assert a.poll()  # EOF is readable
    with pytest.raises(EOFError):
        a.recv()
    with pytest.raises(OSError):  # the reader of a.tx is gone too
        a.send(("stop", None))


def test_across_a_spawned_process() -> None:
    ctx = mp.get_context("spawn")
    down_rx, down_tx = ctx.Pipe(duplex=False)
    up_rx, up_tx = ctx.Pipe(duplex=False)
    parent, child = Channel(up_rx, down_tx), Channel(down_rx, up_tx)
    proc = ctx.Process(target=_echo, args=(child,))
    proc.start()
    child.close()  # the parent keeps no copy of the child's ends: the child's exit must read as EOF
    try:
        for i in range(3):
            parent.send(step_message(i))
            assert parent.poll(30) and parent.recv() == ("echo", step_message(i))
        parent.send(None)
        proc.join(30)
        assert proc.exitcode == 0
        with pytest.raises(EOFError):
            parent.recv()
    finally:
        if proc.is_alive():
            proc.kill()
