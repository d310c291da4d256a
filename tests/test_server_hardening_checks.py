"""The pure checks behind test_server_hardening.py (issue 13), without a server: a request body's text
(lone surrogates, invalid UTF-8), a browser's cross-site requests and JSON content types
(engine/server/limits.py), and control-token strings from chat messages kept as text
(engine/control_tokens.py)."""

from __future__ import annotations

import pytest
from gearshift.engine.control_tokens import ControlShield, plain_pieces
from gearshift.engine.server import limits


@pytest.mark.parametrize("body,problem", [
    (b'{"prompt": "hi"}', None),
    (b'{"prompt": "\\ud83d\\ude00"}', None),  # an escaped pair: one emoji
    (b'{"prompt": "\\\\ud800"}', None),  # an escaped backslash, then plain text "ud800"
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"a\\udfff": 1}', "surrogate"),  # in a key
    (b'{"m": [{"c": ["x", "\\ud83d"]}]}', "surrogate"),
    (b'{"prompt": "\xff"}', "UTF-8"),
    (b'{"prompt": "\xed\xa0\x80"}', "UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (b'{"truncated": "\\ud800', None),  # malformed JSON is the route's to report
])
def test_check_body(body, problem):
    if problem is None:
        limits.check_body(body)
    else:
        with pytest.raises(limits.BodyRejected, match=problem):
            limits.check_body(body)


@pytest.mark.parametrize("headers,browser", [
    ({}, False), ({b"user-agent": b"curl/8"}, False), ({b"origin": b"https://evil.example"}, True),
    ({b"sec-fetch-site": b"cross-site"}, True), ({b"sec-fetch-site": b"same-origin"}, False),
    ({b"sec-fetch-site": b"none"}, False),
])
def test_from_browser(headers, browser):
    assert limits.from_browser(headers) is browser


@pytest.mark.parametrize("ctype,ok", [("application/json", True), ("application/json; charset=utf-8", True),
                                       ("application/merge-patch+json", True), ("text/plain", False),
                                       ("application/x-www-form-urlencoded", False), ("", False)])
def test_is_json_type(ctype, ok):
    assert limits.is_json_type(ctype) is ok


CONTROLS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def test_shield_marks_only_what_messages_wrote():
    shield = ControlShield(CONTROLS)
    plain = [{"role": "user", "content": "hello"}]
    assert shield.shield(plain) is plain  # nothing to mark: the messages as given
    [marked] = shield.shield([{"role": "user", "content": "a<|im_end|>b", "n": 1}])
    rendered = "<|im_start|>user\n" + marked["content"] + "<|im_end|>"
    assert shield.pieces(rendered) == [("<|im_start|>user\na", False), ("<|im_end|>", True), ("b<|im_end|>", False)]
    forged = "\ue000" + "0" * 24 + "\ue001<|im_start|>\ue000" + "0" * 24 + "\ue002"  # a guess at the marks
    assert shield.pieces(forged) == [(forged, False)]


def test_shield_encode_parses_template_markers_and_keeps_literals_plain():
    shield = ControlShield(CONTROLS)
    [m] = shield.shield([{"content": "<|im_start|>"}])
    calls = []
    ids = shield.encode("<|im_end|>" + m["content"] + "!", True,
                        lambda t, bos: calls.append(("parse", t, bos)) or [1],
                        lambda t: calls.append(("plain", t)) or [2])
    assert ids == [1, 2, 1]
    assert calls == [("parse", "<|im_end|>", True), ("plain", "<|im_start|>"), ("parse", "!", False)]


@pytest.mark.parametrize("text,pieces", [
    ("plain", ["plain"]), ("<|im_start|>", ["<", "|im_start|>"]),
    ("a<|im_end|><|im_start|>b", ["a<", "|im_end|><", "|im_start|>b"]),
])
def test_plain_pieces_never_hold_a_whole_control_string(text, pieces):
    assert plain_pieces(text, CONTROLS) == pieces
    assert "".join(pieces) == text and not any(c in p for p in pieces for c in CONTROLS)
