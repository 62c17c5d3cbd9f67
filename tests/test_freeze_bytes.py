"""A version's SHA-256 is over canonical JSON lines. They are made by orjson now (freezing 100k examples
spent most of its time in ``json.dumps``/``json.loads``), and must stay the exact bytes ``json.dumps``
made before, or the same content frozen again would get another hash than an auditor recorded."""

import hashlib
import json
import random

import pytest

from datasets_app.services import versions


def _reference(body) -> bytes:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


# every character up to U+07FF (controls, quotes, backslash, DEL, Latin-1, U+0085), U+2028/U+2029, a sweep of
# the rest of the BMP and of the astral planes (emoji, CJK extension B, private use)
CHARACTERS = (
    [chr(c) for c in range(0x800)]
    + ["\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff"]
    + [chr(c) for c in range(0x800, 0xD800, 61)]
    + [chr(c) for c in range(0xE000, 0x10000, 59)]
    + [chr(c) for c in range(0x10000, 0x110000, 4093)]
)


def test_canonical_bytes_equal_json_dumps_for_every_character():
    for ch in CHARACTERS:
        body = versions.canonical_record(
            [{"role": "user", "content": f"a{ch}b"}, {"role": "assistant", "content": ch}],
            None,
            None,
            [ch],
            "eval",
        )
        assert versions.canonical_bytes(body) == _reference(body), f"U+{ord(ch):04X}"


def test_canonical_bytes_equal_json_dumps_for_random_records():
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(0, 40)))
        preference = rng.random() < 0.5
        body = versions.canonical_record(
            [{"role": "system", "content": text[::-1]}, {"role": "user", "content": text}],
            text if preference else None,
            text.upper() if preference else None,
            [text[:5], "billing"] if rng.random() < 0.5 else [],
            rng.choice(["train", "eval", "golden"]),
        )
        assert versions.canonical_bytes(body) == _reference(body)
        assert versions.record_digest(body) == hashlib.sha256(_reference(body)).hexdigest()


def test_what_orjson_refuses_still_gets_the_json_dumps_bytes():
    body = versions.canonical_record(
        [{"role": "user", "content": "lone \ud800 surrogate"}], None, None, [], "train"
    )
    with pytest.raises(UnicodeEncodeError):  # as before: such text cannot be written as UTF-8 at all
        versions.canonical_bytes(body)
    big = {"messages": [], "n": 2**70}  # integers past 64 bits: orjson refuses them, json writes them
    assert versions.canonical_bytes(big) == _reference(big)
    assert versions._loads('{"a": "\\ud800"}') == json.loads('{"a": "\\ud800"}')


def test_export_lines_still_escape_the_characters_that_split_lines():
    for ch in ("\u0085", "\u2028", "\u2029"):
        line = versions.export_line([{"role": "user", "content": f"x{ch}y"}], None, None, ["t"], "train")
        assert ch.encode() not in line and line.count(b"\n") == 1 and line.endswith(b"\n")
        assert json.loads(line)["messages"][0]["content"] == f"x{ch}y"
    plain = versions.export_line([{"role": "user", "content": "caf\u00e9"}], None, None, [], "train")
    assert (
        plain
        == (
            json.dumps(
                {"messages": [{"role": "user", "content": "caf\u00e9"}], "split": "train"}, ensure_ascii=False
            )
            + "\n"
        ).encode()
    )
