"""Stop-string hold-back and legacy logprobs, without a server."""

from __future__ import annotations

from qserve.server.engine_thread import Delta
from qserve.server.formatting import Choice, completion_logprobs, stop_holdback
from qserve.types import TokenLogprob


def test_stop_holdback() -> None:
    assert stop_holdback("hello wor", ["world"]) == 3
    assert stop_holdback("hello w", ["world", "xyz"]) == 1
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab", ["abc", "b"]) == 2
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("abc", []) == 0


def test_streaming_holds_back_a_possible_stop_string() -> None:
    c = Choice([1], "", ["END"], echo=False)
    sent = []
    # the engine's text grows: "x E" may become "x END" ... but here it turns out to be "x EN!"
    for text in ["x", "x E", "x EN", "x EN!", "x EN! E"]:
        c.update(Delta(0, text, [1], None, 0, False))
        sent.append(c.take(False)[0])
    assert sent == ["x", " ", "", "EN!", " "]
    # the stop string completes: the engine cuts it, and the held-back "E" is never sent
    c.update(Delta(0, "x EN! ", [1], None, 0, True, "stop"))
    assert c.take(True)[0] == ""
    assert c.sent == len("x EN! ")


def test_legacy_logprobs_with_echo() -> None:
    class Bytes:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return bytes(ids).decode(errors="replace")

    from qserve.server.formatting import TokenTexts

    tt = TokenTexts(Bytes())
    c = Choice(list(b"ab"), "ab", [], echo=True)
    c.update(
        Delta(
            0,
            "c",
            [99],
            [TokenLogprob(99, -0.5, {100: -0.25})],
            1,
            True,
            "length",
            prompt_logprobs=[None, TokenLogprob(98, -1.0, {97: -0.1})],
        )
    )
    lp = completion_logprobs(c, tt)
    assert lp["tokens"] == ["a", "b", "c"]
    assert lp["token_logprobs"] == [None, -1.0, -0.5]
    assert lp["top_logprobs"] == [None, {"a": -0.1, "b": -1.0}, {"d": -0.25, "c": -0.5}]
    assert lp["text_offset"] == [0, 1, 2]
