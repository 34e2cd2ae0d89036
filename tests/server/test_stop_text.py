"""Stop strings without a server: the engine's matcher (TGI's rules, special tokens kept) and
the OpenAI routes' trimming and holding back of text that could still become a stop."""

from __future__ import annotations

from genserve.engine.outputs import RequestOutput
from genserve.engine.sequence import FinishReason
from genserve.engine.stop_strings import StopMatcher
from genserve.server.serving import HeldText, stop_prefix_len, token_string, without_stop


def feed_all(matcher, pieces):
    for k, (piece, special) in enumerate(pieces):
        m = matcher.feed(piece, special)
        if m is not None:
            return k, m
    return None, None


def test_stop_spanning_tokens_is_found_in_the_token_that_completes_it():
    k, m = feed_all(StopMatcher(["DEFGHIJ"]), [(" ABC", False), ("DEF", False), ("GH", False), ("I", False),
                                               ("JKL", False)])
    assert k == 4 and m.stop == "DEFGHIJ" and m.after == 2 and m.visible == 7


def test_first_listed_stop_wins_and_text_after_it_is_dropped():
    k, m = feed_all(StopMatcher(["xyz", "y"]), [("axyzb", False)])
    assert (k, m.stop, m.after) == (0, "xyz", 1)
    k, m = feed_all(StopMatcher(["y", "xyz"]), [("axyzb", False)])
    assert (m.stop, m.after) == ("y", 2)


def test_special_token_text_matches_but_is_not_visible():
    k, m = feed_all(StopMatcher(["<|im_start|>"]), [("Hi", False), ("<|im_start|>", True)])
    assert k == 1 and m.after == 0 and m.visible == 0
    k, m = feed_all(StopMatcher(["!<|im_end|>"]), [("Hi!", False), ("<|im_end|>", True)])
    assert k == 1 and m.visible == 1  # the "!" is in the text, the special token is not


def test_no_stop_no_match():
    assert feed_all(StopMatcher(["zz"]), [("a", False), ("z", False), ("a", False)]) == (None, None)
    assert StopMatcher([]).feed("anything", False) is None


def out(text, finished=False, reason=None, stop_chars=0):
    return RequestOutput("r", text=text, finished=finished, finish_reason=reason, stop_chars=stop_chars)


def test_held_text_never_sends_a_stop_spanning_tokens():
    held = HeldText(["DEFGHIJ"])
    sent = [held.feed(out(" ABC")), held.feed(out("DEF")), held.feed(out("GH")), held.feed(out("I")),
            held.feed(out("J", True, FinishReason.STOP, 7))]
    assert sent == [" ABC", "", "", "", ""]


def test_held_text_releases_a_false_start():
    held = HeldText(["DEFGHIJ"])
    assert [held.feed(out("xDE")), held.feed(out("Fz")), held.feed(out("!", True, FinishReason.LENGTH))] == \
        ["x", "DEFz", "!"]


def test_without_stop_and_prefix_lengths():
    assert without_stop("Paris", FinishReason.STOP, 4) == "P"
    assert without_stop("Paris", FinishReason.LENGTH, 4) == "Paris"
    assert stop_prefix_len("abcDE", ["DEF", "cDX"]) == 2 and stop_prefix_len("abc", ["x"]) == 0


def test_token_string_renders_partial_characters_as_bytes():
    assert token_string("é".encode()) == "é"
    assert token_string(b"\xf0\x9f") == "bytes:\\xf0\\x9f"
