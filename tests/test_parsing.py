"""Tests for datasets_app.parsing (pure Python; run with ``-p no:django``)."""

from __future__ import annotations

import csv
import gc
import json
import random
import tracemalloc
from pathlib import Path

import orjson
import pytest

from datasets_app import parsing
from datasets_app.parsing import (
    FILE_ERROR_CODES,
    FORMATS,
    REJECTION_CODES,
    CsvMapping,
    FileError,
    Record,
    Rejection,
    csv_columns,
    detect_format,
    guess_csv_mapping,
    parse_file,
    validate_messages,
    validate_preference,
)

DATA = Path(__file__).parent / "data"
GOOD = DATA / "good"
BAD = DATA / "bad"

PREF = {"kind": "preference"}
QA = {"csv_mapping": CsvMapping(prompt="question", response="answer")}


def parse(path: Path, **kwargs) -> tuple[list[Record], list[Rejection]]:
    records, rejections = [], []
    for item in parse_file(path, **kwargs):
        (records if isinstance(item, Record) else rejections).append(item)
    return records, rejections


def user_assistant(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def word_count(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


# --------------------------------------------------------------------------- good files


def with_bom(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    return dst


def with_crlf(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return dst


VARIANTS = {
    "plain": lambda src, tmp: src,
    "bom": lambda src, tmp: with_bom(src, tmp / src.name),
    "crlf": lambda src, tmp: with_crlf(src, tmp / src.name),
    "bom+crlf": lambda src, tmp: with_bom(with_crlf(src, tmp / ("crlf-" + src.name)), tmp / src.name),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request, tmp_path):
    return lambda name: VARIANTS[request.param](GOOD / name, tmp_path)


def test_openai_good(variant):
    path = variant("openai.jsonl")
    assert detect_format(path) == "openai"
    records, rejections = parse(path)
    assert rejections == []
    assert [r.line for r in records] == [1, 2, 4]
    assert records[0].messages == user_assistant(
        "Where is my order #1042?", "It left our warehouse this morning."
    )
    assert records[0].tags == []
    assert records[1].messages[0] == {"role": "system", "content": "You are Acme's support agent."}
    assert [m["role"] for m in records[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1].tags == ["shipping", "address"]  # stripped, empty dropped, deduplicated
    assert records[2].messages[0]["content"] == "Merci, ça marche très bien ✨"
    assert all(r.chosen is None and r.rejected is None for r in records)


def test_sharegpt_good(variant):
    path = variant("sharegpt.jsonl")
    assert detect_format(path) == "sharegpt"
    records, rejections = parse(path)
    assert rejections == []
    assert [r.line for r in records] == [1, 2, 3]
    assert records[0].messages == user_assistant("Is the store open on Sunday?", "Yes, from 10am to 4pm.")
    assert [m["role"] for m in records[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1].tags == ["shipping"]
    assert records[2].messages[0] == {"role": "system", "content": "You are a billing assistant."}
    assert records[2].messages[2]["role"] == "assistant"


def test_alpaca_good(variant):
    path = variant("alpaca.jsonl")
    assert detect_format(path) == "alpaca"
    records, rejections = parse(path)
    assert rejections == []
    assert records[0].messages == user_assistant(
        "Summarise the customer's complaint.\n\nThe parcel arrived late and damaged.",
        "Late, damaged delivery.",
    )
    assert records[1].messages == user_assistant(
        "Translate to German: 'Your refund is on its way.'", "Ihre Rückerstattung ist unterwegs."
    )
    assert records[2].messages == [
        {"role": "system", "content": "Answer with one word."},
        *user_assistant("Classify the ticket.", "billing"),
    ]
    assert records[2].tags == ["classification"]


def test_csv_good(variant):
    path = variant("conversations.csv")
    assert detect_format(path) == "csv"
    assert csv_columns(path) == ["question", "answer", "system", "tags"]
    mapping = CsvMapping(prompt="question", response="answer", system="system", tags="tags")
    records, rejections = parse(path, csv_mapping=mapping)
    assert rejections == []
    assert [r.line for r in records] == [2, 3, 7]  # a multi-line record reports its first line
    assert records[0].messages == user_assistant(
        "Where is my order #1042?", "It left our warehouse this morning."
    )
    assert records[0].tags == ["shipping"]
    assert records[1].messages == [
        {"role": "system", "content": "You are a billing assistant."},
        *user_assistant(
            'My invoice says "EUR" but I pay in USD, why?',
            "Invoices use the account currency.\n\nYou can change it under Settings.",
        ),
    ]
    assert records[1].tags == ["billing", "currency"]
    assert records[2].messages == user_assistant("Do you ship to Norway?", "Yes, in 3-5 days.")


def test_csv_semicolon_delimiter_and_guessed_mapping(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text(
        "Question;Answer\r\nWo ist meine Bestellung?;Sie ist unterwegs, morgen da.\r\n", encoding="utf-8-sig"
    )
    assert csv_columns(path) == ["Question", "Answer"]
    assert guess_csv_mapping(csv_columns(path)) == CsvMapping("Question", "Answer")
    records, rejections = parse(path)  # no mapping given: guessed from the column names
    assert rejections == []
    assert records[0].messages == user_assistant("Wo ist meine Bestellung?", "Sie ist unterwegs, morgen da.")


def test_preference_good(variant):
    path = variant("preference.jsonl")
    assert detect_format(path) == "preference"
    records, rejections = parse(path, kind="preference")
    assert rejections == []
    assert [r.line for r in records] == [1, 2, 3, 4]
    first, listed, messages_key, implicit = records
    assert first.messages == [{"role": "user", "content": "How do I reset my password?"}]
    assert (first.chosen, first.rejected) == ("Click 'Forgot password' on the login page.", "No idea.")
    assert [m["role"] for m in listed.messages] == ["system", "user"]
    assert listed.tags == ["churn"]
    assert [m["role"] for m in messages_key.messages] == ["user", "assistant", "user"]
    assert (messages_key.chosen, messages_key.rejected) == ("Sure, it is on its way.", "No.")
    assert implicit.messages == [{"role": "user", "content": "Is it waterproof?"}]
    assert (implicit.chosen, implicit.rejected) == ("Yes, up to 30 m.", "Maybe.")


def test_json_array_indented_reports_element_lines(variant):
    path = variant("alpaca_array.json")
    assert detect_format(path) == "alpaca"
    records, rejections = parse(path)
    assert rejections == []
    assert [r.line for r in records] == [2, 7, 12]
    assert records[1].messages == user_assistant("Write a greeting.", "Hello! How can I help you today?")
    assert records[2].tags == ["classification"]


def test_json_array_on_one_line():
    path = GOOD / "sharegpt_array.json"
    assert detect_format(path) == "sharegpt"
    records, rejections = parse(path)
    assert rejections == []
    assert [r.line for r in records] == [1, 1]
    assert records[1].messages == user_assistant("Do you sell gift cards?", "Yes, in the app.")


def test_json_array_split_across_read_chunks(tmp_path):
    """Element boundaries, strings and escapes that straddle the 1 MiB read chunks."""
    items = [
        {
            "messages": user_assistant(
                f'Question {i} \\ "quoted" [a, {{b}}], {"é" * (i % 7)}', "Answer " + "z" * (i * 37 % 5000)
            )
        }
        for i in range(1500)
    ]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False), encoding="utf-8")
    records, rejections = parse(path)
    assert rejections == []
    assert [r.messages for r in records] == [i["messages"] for i in items]
    assert [r.line for r in records] == [2 + 12 * i for i in range(1500)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_json_array_with_tiny_read_chunks(tmp_path, monkeypatch, chunk):
    """Every possible chunk boundary: inside strings, after a backslash, between tokens."""
    monkeypatch.setattr(parsing, "_READ_CHUNK", chunk)
    items = [
        {"messages": user_assistant('a "b" \\ [c, {d}] \u00e9 \n', "x\\"), "tags": ["t]", "{u"]},
        {"messages": user_assistant("é ✨", '\\"'), "tags": []},
    ]
    path = tmp_path / "tiny.json"
    path.write_text(
        "\ufeff[\r\n" + ",\r\n".join(json.dumps(i) for i in items) + "\r\n]\r\n", encoding="utf-8"
    )
    records, rejections = parse(path)
    assert rejections == []
    assert [(r.line, r.messages, r.tags) for r in records] == [
        (2, items[0]["messages"], ["t]", "{u"]),
        (3, items[1]["messages"], []),
    ]


def test_forced_format(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "not recognisable"}\n{"dialogue": []}\n')
    with pytest.raises(FileError) as exc:
        parse_file(path)
    assert exc.value.code == "unknown_format"
    records, rejections = parse(path, fmt="openai")
    assert records == []
    assert [(r.line, r.code) for r in rejections] == [(1, "missing_field"), (2, "missing_field")]
    records, rejections = parse(GOOD / "openai.jsonl", fmt="sharegpt")
    assert records == []
    assert [(r.line, r.code) for r in rejections] == [
        (1, "format_mismatch"),
        (2, "format_mismatch"),
        (4, "format_mismatch"),
    ]


def test_detection_skips_a_broken_first_record(tmp_path):
    path = tmp_path / "first_broken.jsonl"
    path.write_text('{"messages": [\n' + (GOOD / "openai.jsonl").read_text())
    assert detect_format(path) == "openai"
    records, rejections = parse(path)
    assert [(r.line, r.code) for r in rejections] == [(1, "invalid_json")]
    assert len(records) == 3


# --------------------------------------------------------------------------- bad files

BAD_CASES = [
    # (file, parse_file kwargs, expected (line, code) rejections, number of good records)
    ("invalid_json.jsonl", {}, [(2, "invalid_json")], 2),
    ("not_object.jsonl", {}, [(3, "not_object")], 2),
    ("encoding_latin1_byte.jsonl", {}, [(2, "encoding")], 2),
    ("nul_byte.jsonl", {}, [(2, "nul_bytes")], 2),
    ("line_too_long.jsonl", {"max_line_bytes": 1024}, [(2, "line_too_long")], 2),
    ("too_deep.jsonl", {}, [(2, "too_deep")], 2),
    ("missing_messages.jsonl", {}, [(2, "missing_field")], 1),
    ("messages_not_list.jsonl", {}, [(2, "wrong_type")], 1),
    ("message_not_object.jsonl", {}, [(3, "wrong_type")], 2),
    ("tags_not_list.jsonl", {}, [(2, "wrong_type")], 1),
    ("tags_not_strings.jsonl", {}, [(1, "wrong_type")], 1),
    ("unknown_role.jsonl", {}, [(2, "unknown_role")], 1),
    ("system_not_first.jsonl", {}, [(2, "system_not_first")], 1),
    ("no_assistant.jsonl", {}, [(2, "no_assistant")], 1),
    ("not_ending_assistant.jsonl", {}, [(2, "not_ending_assistant")], 2),
    ("empty_content.jsonl", {}, [(2, "empty_content")], 1),
    ("content_not_string.jsonl", {}, [(2, "content_not_string")], 1),
    ("content_parts_list.jsonl", {}, [(2, "content_not_string")], 1),
    ("consecutive_roles.jsonl", {}, [(2, "consecutive_roles")], 1),
    ("no_user.jsonl", {}, [(2, "no_user")], 1),
    ("not_starting_user.jsonl", {}, [(2, "not_starting_user")], 1),
    ("empty_messages.jsonl", {}, [(2, "empty_messages")], 1),
    ("unknown_split.jsonl", {}, [(2, "unknown_split"), (3, "unknown_split")], 2),
    ("missing_role.jsonl", {}, [(2, "missing_field")], 1),
    ("format_mismatch.jsonl", {}, [(2, "format_mismatch")], 2),
    ("nul_escape.jsonl", {}, [(2, "nul_bytes")], 1),
    ("lone_surrogate.jsonl", {}, [(2, "encoding")], 1),
    ("crlf_blank_lines.jsonl", {}, [(5, "no_user")], 3),
    ("sharegpt_unknown_from.jsonl", {}, [(2, "unknown_role")], 1),
    ("sharegpt_missing_value.jsonl", {}, [(2, "missing_field")], 1),
    ("sharegpt_not_list.jsonl", {}, [(2, "wrong_type")], 1),
    ("alpaca_missing_output.jsonl", {}, [(2, "missing_field")], 1),
    ("alpaca_empty_instruction.jsonl", {}, [(2, "empty_content")], 1),
    ("alpaca_input_wrong_type.jsonl", {}, [(2, "content_not_string")], 1),
    ("preference_empty_chosen.jsonl", PREF, [(2, "empty_chosen")], 1),
    ("preference_empty_rejected.jsonl", PREF, [(2, "empty_rejected")], 1),
    ("preference_identical.jsonl", PREF, [(2, "identical_pair")], 1),
    ("preference_missing_rejected.jsonl", PREF, [(2, "missing_field")], 1),
    ("preference_prompt_ends_assistant.jsonl", PREF, [(2, "not_ending_user")], 1),
    ("preference_chosen_not_ending_assistant.jsonl", PREF, [(2, "not_ending_assistant")], 1),
    ("preference_pair_mismatch.jsonl", PREF, [(2, "pair_mismatch")], 1),
    ("preference_format_mismatch.jsonl", PREF, [(2, "format_mismatch")], 1),
    ("csv_empty_response.csv", QA, [(3, "empty_content")], 2),
    ("csv_column_count.csv", QA, [(3, "column_count")], 1),
    ("csv_multiline_line_numbers.csv", QA, [(4, "empty_content")], 2),
    ("csv_bad_quote.csv", QA, [(2, "invalid_csv")], 1),
    ("csv_unclosed_quote.csv", QA, [(3, "invalid_csv")], 1),
    ("csv_encoding.csv", QA, [(3, "encoding")], 2),
    ("csv_line_too_long.csv", {**QA, "max_line_bytes": 1024}, [(3, "line_too_long")], 2),
    ("array_invalid_element.json", {}, [(3, "invalid_json")], 2),
    ("array_missing_field.json", {}, [(6, "missing_field")], 2),
    ("array_truncated.json", {}, [(6, "invalid_json")], 1),
    ("array_trailing_content.json", {}, [(8, "invalid_json")], 1),
    ("array_too_deep.json", {}, [(2, "too_deep")], 1),
    ("array_not_object.json", {}, [(2, "not_object")], 2),
]


@pytest.mark.parametrize(("name", "kwargs", "expected", "good"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_file(name, kwargs, expected, good):
    records, rejections = parse(BAD / name, **kwargs)
    assert [(r.line, r.code) for r in rejections] == expected
    assert len(records) == good
    for rejection in rejections:
        assert rejection.code in REJECTION_CODES
        assert len(rejection.reason) > 30 and rejection.reason.endswith(".")
        assert rejection.raw and len(rejection.raw) <= 64 * 1024


def test_every_bad_file_is_tested():
    tested = {c[0] for c in BAD_CASES} | {c[0] for c in FILE_CASES}
    assert {p.name for p in BAD.iterdir()} == tested
    assert len(BAD_CASES) >= 30


def test_rejection_reasons_name_the_field():
    def reason(name: str, **kwargs) -> str:
        return parse(BAD / name, **kwargs)[1][0].reason

    assert reason("unknown_role.jsonl").startswith(
        'messages[2].role is "tool"; allowed roles are system, user, assistant.'
    )
    assert "conversations[1].from" in reason("sharegpt_unknown_from.jsonl")
    assert "messages[0] and messages[1] are both user turns" in reason("consecutive_roles.jsonl")
    assert "messages[1].content is empty" in reason("empty_content.jsonl")
    assert "tags[1] is a number (3)" in reason("tags_not_strings.jsonl")
    assert "column 49" in reason("invalid_json.jsonl") and "Expecting ',' delimiter" in reason(
        "invalid_json.jsonl"
    )
    encoding = reason("encoding_latin1_byte.jsonl")
    assert "0xE9" in encoding and "file offset" in encoding and "UTF-8" in encoding
    assert 'column "answer" is empty' in reason("csv_empty_response.csv", **QA)
    assert 'ShareGPT format (it has "conversations")' in reason("format_mismatch.jsonl")
    assert "line 3, character 21" in reason("array_invalid_element.json")


def test_csv_unclosed_quote_is_bounded_by_max_line_bytes(tmp_path):
    path = tmp_path / "unclosed.csv"
    rows = ["question,answer", "Ok?,Ok.", 'Where is my order?,"It ships tomorrow.'] + [
        "Thanks,You're welcome."
    ] * 200
    path.write_text("\n".join(rows) + "\n")
    records, rejections = parse(path, max_line_bytes=1024, **QA)
    assert [(r.line, r.code) for r in rejections] == [(3, "line_too_long")]
    assert "quote" in rejections[0].reason
    assert rejections[0].raw.startswith(b'Where is my order?,"It ships tomorrow.\nThanks')
    # the oversized record swallowed the lines up to the limit; parsing resumes after it
    assert records[0].line == 2
    assert 40 < records[1].line < 60  # about 1024 bytes later
    assert records[-1].line == 203


def test_rejection_raw_is_the_original_line():
    _, rejections = parse(BAD / "invalid_json.jsonl")
    assert rejections[0].raw == (BAD / "invalid_json.jsonl").read_bytes().split(b"\n")[1]
    _, rejections = parse(BAD / "csv_multiline_line_numbers.csv", **QA)
    assert rejections[0].raw == b',"An answer\nwithout a question"'


# --------------------------------------------------------------------------- whole-file errors

FILE_CASES = [
    ("file_empty.jsonl", {}, "empty_file"),
    ("file_blank_lines.jsonl", {}, "empty_file"),
    ("file_empty_array.json", {}, "empty_file"),
    ("file_image.png", {}, "binary_file"),
    ("file_binary.bin", {}, "binary_file"),
    ("file_compressed.jsonl.gz", {}, "compressed_file"),
    ("file_archive.zip", {}, "compressed_file"),
    ("file_utf16.csv", QA, "not_utf8"),
    ("file_utf16_no_bom.jsonl", {}, "not_utf8"),
    ("file_latin1.jsonl", {}, "not_utf8"),
    ("file_unknown_format.jsonl", {}, "unknown_format"),
    ("file_plain_text.txt", {}, "unknown_format"),
    ("file_pretty_printed.json", {}, "unknown_format"),
    ("file_preference.jsonl", {}, "kind_mismatch"),
    ("file_columns.csv", QA, "missing_columns"),
]


@pytest.mark.parametrize(("name", "kwargs", "code"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_error(name, kwargs, code):
    with pytest.raises(FileError) as exc:
        parse_file(BAD / name, **kwargs)  # raised at call time, before iterating
    assert exc.value.code == code
    assert exc.value.code in FILE_ERROR_CODES
    assert len(exc.value.reason) > 20


def test_file_error_reasons():
    with pytest.raises(FileError) as exc:
        parse_file(BAD / "file_columns.csv", **QA)
    assert '"question", "answer"' in exc.value.reason
    assert '"ticket_id", "customer_message", "agent_reply"' in exc.value.reason
    assert exc.value.line == 1
    with pytest.raises(FileError) as exc:
        detect_format(BAD / "file_unknown_format.jsonl")
    assert "prompt/completion" in exc.value.reason.lower()
    with pytest.raises(FileError) as exc:
        detect_format(BAD / "file_compressed.jsonl.gz")
    assert "gzip" in exc.value.reason
    with pytest.raises(FileError) as exc:
        detect_format(BAD / "file_utf16.csv")
    assert "UTF-16" in exc.value.reason
    with pytest.raises(FileError) as exc:
        detect_format(BAD / "file_pretty_printed.json")
    assert "pretty-printed" in exc.value.reason


def test_csv_header_with_unclosed_quote_is_not_a_header(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text('question,"answer\nWhere?,Here.\n')
    with pytest.raises(FileError) as exc:
        parse_file(path, **QA)
    assert exc.value.code == "unknown_format"


def test_kind_mismatch_both_ways():
    with pytest.raises(FileError) as exc:
        parse_file(GOOD / "openai.jsonl", kind="preference")
    assert exc.value.code == "kind_mismatch"
    with pytest.raises(FileError) as exc:
        parse_file(GOOD / "preference.jsonl", fmt="preference", kind="sft")
    assert exc.value.code == "kind_mismatch"


def test_csv_mapping_required_and_csv_columns_errors():
    with pytest.raises(FileError) as exc:
        parse_file(BAD / "file_columns.csv")
    assert exc.value.code == "csv_mapping_required"
    assert "customer_message" in exc.value.reason
    mapping = CsvMapping(prompt="customer_message", response="agent_reply")
    records, rejections = parse(BAD / "file_columns.csv", csv_mapping=mapping)
    assert (len(records), rejections) == (1, [])
    with pytest.raises(FileError) as exc:
        csv_columns(GOOD / "openai.jsonl")
    assert exc.value.code == "not_csv"
    with pytest.raises(FileError) as exc:
        csv_columns(BAD / "file_image.png")
    assert exc.value.code == "binary_file"


def test_programmer_errors():
    with pytest.raises(ValueError):
        parse_file(GOOD / "openai.jsonl", fmt="yaml")
    with pytest.raises(ValueError):
        parse_file(GOOD / "openai.jsonl", kind="rlhf")


# --------------------------------------------------------------------------- limits & streaming


def test_huge_line_is_skipped_in_bounded_memory(tmp_path):
    good = json.dumps({"messages": user_assistant("Hi", "Hello")})
    path = tmp_path / "huge.jsonl"
    with path.open("w") as fh:
        fh.write(good + "\n")
        fh.write('{"messages": [{"role": "user", "content": "' + "x" * (30 * 1024 * 1024) + '"}]}\n')
        fh.write(good + "\n")
    gc.collect()
    tracemalloc.start()
    try:
        records, rejections = parse(path, max_line_bytes=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r.line, r.code) for r in rejections] == [(2, "line_too_long")]
    assert [r.line for r in records] == [1, 3]
    assert len(rejections[0].raw) == 64 * 1024
    assert "30 MiB" in rejections[0].reason and "1 MiB limit" in rejections[0].reason
    assert peak < 8 * 1024 * 1024


def test_huge_array_element_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.json"
    with path.open("w") as fh:
        fh.write('[{"instruction": "A", "output": "a"},\n {"instruction": "B", "output": "')
        fh.write("y\\n" * (10 * 1024 * 1024))
        fh.write('"},\n {"instruction": "C", "output": "c"}]')
    gc.collect()
    tracemalloc.start()
    try:
        records, rejections = parse(path, max_line_bytes=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r.line, r.code) for r in rejections] == [(2, "line_too_long")]
    assert [r.line for r in records] == [1, 3]
    assert peak < 8 * 1024 * 1024


def test_deep_nesting_never_raises_recursion_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    good = json.dumps({"messages": user_assistant("Hi", "Hello")})
    path.write_text(
        good + "\n" + "[" * 200_000 + "]" * 200_000 + "\n" + '{"messages": ' + "[" * 70 + "]" * 70 + "}\n"
    )
    _, rejections = parse(path)
    assert [(r.line, r.code) for r in rejections] == [(2, "too_deep"), (3, "too_deep")]


def test_too_long_with_token_counter(tmp_path):
    path = tmp_path / "tokens.jsonl"
    lines = [
        {"messages": user_assistant("one two", "three four")},  # 4 words
        {"messages": user_assistant("one two three", "four five six seven")},  # 7 words
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, rejections = parse(path, max_tokens=5, count_tokens=word_count)
    assert [r.line for r in records] == [1]
    assert [(r.line, r.code) for r in rejections] == [(2, "too_long")]
    assert "7 tokens" in rejections[0].reason and "limit is 5" in rejections[0].reason
    # Without a counter (or without a limit) nothing is rejected for length.
    assert len(parse(path, max_tokens=5)[0]) == 2
    assert len(parse(path, count_tokens=word_count)[0]) == 2


def test_too_long_preference_counts_prompt_and_longer_answer(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = [
        {"prompt": "a b", "chosen": "c", "rejected": "d e f"},  # 2 + 3 = 5
        {"prompt": "a b", "chosen": "c d e f", "rejected": "g"},  # 2 + 4 = 6
    ]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    records, rejections = parse(path, kind="preference", max_tokens=5, count_tokens=word_count)
    assert [r.line for r in records] == [1]
    assert [(r.line, r.code) for r in rejections] == [(2, "too_long")]


@pytest.mark.parametrize("name", ["openai.jsonl", "conversations.csv", "alpaca_array.json"])
def test_progress_callback(tmp_path, name):
    src = (GOOD / name).read_bytes()
    path = tmp_path / name
    if name.endswith(".json"):
        items = json.loads(src) * 20_000
        path.write_text(json.dumps(items, indent=2))
    else:
        header, _, body = src.partition(b"\n") if name.endswith(".csv") else (b"", b"", src)
        path.write_bytes((header + b"\n" if header else b"") + body * 15_000)
    kwargs = {"csv_mapping": CsvMapping("question", "answer")} if name.endswith(".csv") else {}
    calls = []
    count = sum(
        1 for _ in parse_file(path, progress=lambda done, total: calls.append((done, total)), **kwargs)
    )
    size = path.stat().st_size
    assert count > 10_000
    assert size > 3 * 1024 * 1024
    assert calls[-1] == (size, size)
    assert all(total == size for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert 3 <= len(calls) <= size // (1024 * 1024) + 2


def _write_big_jsonl(path: Path, size: int) -> int:
    line = (
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "You are Acme's support agent."},
                    {"role": "user", "content": "Where is my order? " * 40},
                    {"role": "assistant", "content": "It ships tomorrow. " * 60},
                ],
                "tags": ["shipping"],
            }
        )
        + "\n"
    ).encode()
    count = size // len(line) + 1
    with path.open("wb") as fh:
        block = line * 1000
        for _ in range(count // 1000):
            fh.write(block)
        fh.write(line * (count % 1000))
    return count


def _jsonl_to_array(src_path: Path, dst_path: Path) -> None:
    with src_path.open("rb") as src, dst_path.open("wb") as dst:
        dst.write(b"[\n")
        for i, line in enumerate(src):
            dst.write((b",\n" if i else b"") + line.rstrip(b"\n"))
        dst.write(b"\n]\n")


def _jsonl_to_csv(src_path: Path, dst_path: Path) -> None:
    with src_path.open("rb") as src, dst_path.open("w", newline="", encoding="utf-8") as dst:
        writer = csv.writer(dst)
        writer.writerow(["system", "question", "answer", "tags"])
        for line in src:
            system, question, answer = (m["content"] for m in json.loads(line)["messages"])
            writer.writerow(
                [system, question.replace("? ", "?\n", 1), answer, "shipping"]
            )  # two lines a record


@pytest.mark.parametrize("container", ["jsonl", "array", "csv"])
def test_streaming_memory_stays_bounded(tmp_path, container):
    path = tmp_path / "big.jsonl"
    count = _write_big_jsonl(path, (56 if container == "csv" else 50) * 1024 * 1024)  # CSV is more compact
    kwargs = {}
    if container == "array":
        _jsonl_to_array(path, tmp_path / "big.json")
        path = tmp_path / "big.json"
    elif container == "csv":
        _jsonl_to_csv(path, tmp_path / "big.csv")
        path = tmp_path / "big.csv"
        kwargs["csv_mapping"] = CsvMapping("question", "answer", system="system", tags="tags")
    size = path.stat().st_size
    assert size > 50 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        seen = 0
        last_line = 0
        for item in parse_file(path, **kwargs):
            assert isinstance(item, Record)
            seen += 1
            last_line = item.line
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert last_line == {"jsonl": count, "array": count + 1, "csv": 2 * count}[container]
    assert peak < size / 10


# --------------------------------------------------------------------------- validate_messages


@pytest.mark.parametrize(
    ("messages", "kind", "code"),
    [
        (user_assistant("Hi", "Hello"), "sft", None),
        ([{"role": "system", "content": "S"}, *user_assistant("Hi", "Hello")], "sft", None),
        ([{"role": "User", "content": "Hi"}, {"role": "ASSISTANT", "content": "Hello"}], "sft", None),
        ([{"role": "user", "content": "Hi"}], "preference", None),
        ("Hi", "sft", "wrong_type"),
        ([], "sft", "empty_messages"),
        (["Hi"], "sft", "wrong_type"),
        ([{"content": "Hi"}], "sft", "missing_field"),
        ([{"role": "user"}], "sft", "missing_field"),
        ([{"role": 1, "content": "Hi"}], "sft", "wrong_type"),
        ([{"role": "function", "content": "Hi"}], "sft", "unknown_role"),
        ([{"role": "user", "content": 5}], "sft", "content_not_string"),
        ([{"role": "user", "content": "Hi\x00"}, {"role": "assistant", "content": "x"}], "sft", "nul_bytes"),
        (user_assistant("Hi", ""), "sft", "empty_content"),
        ([*user_assistant("Hi", "Hello"), {"role": "system", "content": "S"}], "sft", "system_not_first"),
        ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hello"}], "sft", "no_user"),
        ([{"role": "user", "content": "Hi"}], "sft", "no_assistant"),
        (
            [{"role": "assistant", "content": "Hey"}, *user_assistant("Hi", "Hello")],
            "sft",
            "not_starting_user",
        ),
        ([{"role": "user", "content": "Hi"}, *user_assistant("Hi", "Hello")], "sft", "consecutive_roles"),
        ([*user_assistant("Hi", "Hello"), {"role": "user", "content": "Bye"}], "sft", "not_ending_assistant"),
        (user_assistant("Hi", "Hello"), "preference", "not_ending_user"),
    ],
)
def test_validate_messages(messages, kind, code):
    result = validate_messages(messages, kind=kind)
    if code is None:
        assert result is None
    else:
        assert result is not None
        assert result[0] == code
        assert result[1]


def test_validate_preference():
    prompt = [{"role": "user", "content": "Hi"}]
    assert validate_preference(prompt, "Hello!", "Go away.") is None
    assert validate_preference(prompt, " ", "Go away.")[0] == "empty_chosen"
    assert validate_preference(prompt, "Hello!", "")[0] == "empty_rejected"
    assert validate_preference(prompt, "Same", "Same ")[0] == "identical_pair"
    assert validate_preference(prompt, 3, "x")[0] == "wrong_type"
    assert (
        validate_preference([*prompt, {"role": "assistant", "content": "x"}], "a", "b")[0]
        == "not_ending_user"
    )


def test_public_constants():
    assert FORMATS == ("openai", "sharegpt", "alpaca", "csv", "preference")
    assert all(isinstance(label, str) and label for label in REJECTION_CODES.values())
    required = {
        "invalid_json", "not_object", "encoding", "nul_bytes", "line_too_long", "too_deep", "missing_field",
        "wrong_type", "unknown_role", "system_not_first", "no_assistant", "not_ending_assistant", "empty_content",
        "content_not_string", "consecutive_roles", "no_user", "too_long", "format_mismatch", "empty_chosen",
        "empty_rejected", "identical_pair",
    }  # fmt: skip
    assert required <= REJECTION_CODES.keys()
    tested = {code for *_, expected, _ in BAD_CASES for _, code in expected}
    assert tested | {"too_long", "template_refused"} == REJECTION_CODES.keys()  # the two the import adds


# --------------------------------------------------------------------------- fast path


FAST_PATH_LINES = [
    '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
    '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, '
    '{"role": "assistant", "content": "4"}], "tags": [" math ", "math", "", "Math"]}',
    '{"tags": null, "messages": [{"content": "a", "role": "user"}, {"role": "assistant", "content": "b", "x": 1}]}',
    '{"messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00 \\"q\\" \\\\"}, {"role": "assistant", '
    '"content": "é\\n\\t"}], "meta": {"source": "x"}, "id": 12345678901234567890123}',
    '{"messages": [{"role": "user", "content": "\\u00fcber \\ud83d\\ude00"}, {"role": "assistant", "content": "ß"}], '
    '"id": 12345678901234567890123, "score": 0.5}',
    '{"messages": [{"role": "User", "content": "a"}, {"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a"}]}',
    '{"messages": [{"role": "system", "content": "s"}]}',
    '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
    '{"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a\\u0000"}, {"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a\x01"}, {"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tags": "x"}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tags": [1e400]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tags": '
    "[12345678901234567890123456789]}",
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c"}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "deep": '
    + "[" * 70
    + "]" * 70
    + "}",
    '{"messages": [{"role": "user", "content": "a", "parts": '
    + "[" * 70
    + "]" * 70
    + '}, {"role": "assistant", "content": "b"}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "x": NaN}',
    '{"messages": [], "tags": []}',
    '{"messages": "hi"}',
    '{"conversations": []}',
    "[1, 2]",
    "",
    "   ",
    "not json",
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],}',
]


@pytest.mark.parametrize("container", ["jsonl", "array"])
def test_fast_path_gives_the_same_records_and_rejections(tmp_path, monkeypatch, container):
    """The OpenAI fast path (orjson + inline checks) never changes a result: every line parses to the
    same Record or Rejection as through the general json.loads path."""
    path = tmp_path / f"mixed.{container}"
    lines = [line.encode() for line in FAST_PATH_LINES] + [
        b'{"messages": [{"role": "user", "content": "caf\xc3\xa9"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": "\xc0\xaf"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\x00',
    ]
    if container == "jsonl":
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path.write_bytes(b"[\n" + b",\n".join(line for line in lines if line.strip()) + b"\n]\n")
    taken = []
    real = parsing._OpenAIFormat.fast_record

    def spy(data: bytes, line: int):
        record = real(data, line)
        taken.append(record is not None)
        return record

    monkeypatch.setattr(parsing._OpenAIFormat, "fast_record", staticmethod(spy))
    fast = list(parse_file(path, fmt="openai"))
    assert sum(taken) == 5  # lines 1-3, the non-ASCII one and the valid UTF-8 bytes
    monkeypatch.setattr(parsing._OpenAIFormat, "fast_record", None)
    general = list(parse_file(path, fmt="openai"))
    assert fast == general
    assert sum(isinstance(item, Record) for item in fast) == 9


def test_typed_path_takes_plain_chat_lines_only_and_agrees_with_the_general_path(tmp_path, monkeypatch):
    """The msgspec path takes lines with nothing but valid messages and string tags; every other line
    (extra keys, null tags, a problem to report) falls through, and the records it makes carry the same
    messages, tags and stored JSON as the general path's."""
    lines = [line.encode() for line in FAST_PATH_LINES] + [
        b'{"messages": [{"role": "user", "content": "caf\xc3\xa9 \\u2028 \\u0001"}, '
        b'{"role": "assistant", "content": "b"}], "tags": ["x", " y ", "x"]}',
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": "a\\udc00"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tags": [null]}',
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    taken = []
    real = parsing._typed_record

    def spy(data: bytes, line: int):
        record = real(data, line)
        if record is not None:
            taken.append(line)
        return record

    monkeypatch.setattr(parsing, "_typed_record", spy)
    typed = list(parse_file(path, fmt="openai"))
    assert taken == [1, 2, len(FAST_PATH_LINES) + 1]  # line 3 has "tags": null and a message key "x"
    monkeypatch.setattr(parsing._OpenAIFormat, "fast_record", None)
    general = list(parse_file(path, fmt="openai"))
    assert typed == general
    for item in typed:
        if item.line in taken:
            assert type(item) is parsing.JsonRecord
            twin = next(g for g in general if g.line == item.line)
            assert json.loads(item.messages_json) == twin.messages
            assert item.messages_json == orjson.dumps(twin.messages).decode()  # stored byte for byte alike
    assert typed[-1].line == len(lines) and type(typed[-1]) is not parsing.JsonRecord


def test_fast_paths_agree_with_the_general_path_on_random_lines(tmp_path, monkeypatch):
    """Seeded random lines around the fast paths' edges (roles, blank or odd content, escapes, tags,
    extra keys, broken bytes): the typed and orjson paths never give another result than the general
    path, line for line."""
    rng = random.Random(20261122)
    roles = ["user", "assistant", "system", "User", "tool", "", 3, None]
    contents = [
        "hi",
        "",
        "  ",
        "\n",
        "a\u0000b",
        "caf\u00e9",
        "\ud83d\ude00",
        "x\u2028y",
        "tab\there",
        7,
        None,
    ]
    tag_values = ["billing", " billing ", "", "a|b", 5, None, "\u00e9t\u00e9"]

    def record() -> dict:
        turns = []
        for _ in range(rng.randint(0, 4)):
            turn = {"role": rng.choice(roles), "content": rng.choice(contents)}
            if rng.random() < 0.1:
                turn[rng.choice(["name", "weight"])] = rng.choice([1, "n", [1], {"a": 1}])
            if rng.random() < 0.1:
                turn = dict(reversed(list(turn.items())))
            turns.append(turn)
        if rng.random() < 0.5:  # many well-formed conversations
            turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": rng.choice(contents)}]
        obj = {"messages": turns}
        if rng.random() < 0.5:
            obj["tags"] = rng.choice([None, "x", [rng.choice(tag_values) for _ in range(rng.randint(0, 3))]])
        if rng.random() < 0.15:
            obj[rng.choice(["id", "meta", "chosen"])] = rng.choice([1, "s", [1, 2], {"k": "v"}, 10**30])
        return obj

    lines = []
    for _ in range(1500):
        data = json.dumps(record(), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        if rng.random() < 0.05:
            cut = rng.randrange(len(data))
            data = data[:cut] + rng.choice([b"\xff", b"\x00", b"", b'"', b"\\"]) + data[cut + 1 :]
        lines.append(data)
    path = tmp_path / "random.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    fast = list(parse_file(path, fmt="openai"))
    typed = sum(type(item) is parsing.JsonRecord for item in fast)
    monkeypatch.setattr(parsing._OpenAIFormat, "fast_record", None)
    general = list(parse_file(path, fmt="openai"))
    assert fast == general
    assert typed > 100 and sum(isinstance(item, Record) for item in general) > typed  # both paths exercised


# --------------------------------------------------------------------------- plain chat blocks


def _block_file_lines(rng: random.Random) -> list[bytes]:
    """Mostly plain chat lines, with every kind of line that must leave the block path sprinkled in."""
    good = [
        {
            "messages": [
                {"role": "user", "content": "Where is order ORD-1?"},
                {"role": "assistant", "content": "On its way."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ],
            "tags": ["math"],
        },
        {
            "messages": [
                {"role": "user", "content": "caf\u00e9 \u2028"},
                {"role": "assistant", "content": "ok"},
            ],
            "tags": [" x ", "x", ""],
            "split": "eval",
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tags": [""]},
    ]
    odd = [
        b"",  # blank line
        b"   ",
        b"not json",
        b'{"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "q"}]}',  # order
        b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}',  # blank
        b'{"messages": [{"role": "user", "content": "a\\u0000b"}, {"role": "assistant", "content": "a"}]}',
        b'{"messages": [{"role": "user", "content": "a\\udc00"}, {"role": "assistant", "content": "a"}]}',
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "split": "test"}',
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 7}',
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} {"x": 1}',
        b'{"messages": [{"role": "user", "content": "q"},',  # a value continued on the next line...
        b'{"role": "assistant", "content": "a"}]}',  # ...which also starts with "{"
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "caf\xe9"}]}',
        b"\x00",
        b"[1, 2]",
        b'  {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}  ',
    ]
    lines = [json.dumps(rng.choice(good), ensure_ascii=rng.random() < 0.5).encode() for _ in range(600)]
    for line in odd * 2:  # each odd line twice, anywhere (the continued value's two lines together)
        at = rng.randrange(len(lines))
        lines[at:at] = [line, odd[odd.index(line) + 1]] if line.endswith(b",") else [line]
    return lines


@pytest.mark.parametrize("block_bytes", [37, 500, 4096, 256 * 1024])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_chat_blocks_give_the_line_by_line_results(tmp_path, monkeypatch, block_bytes, ending):
    """The block path (one msgspec decode_lines call per block of lines) gives, line for line, the
    records and rejections of the general path, whatever the block size (blocks cutting lines, lines
    longer than a block), line ending, BOM, odd lines in a block or last line without an ending."""
    rng = random.Random(block_bytes)
    lines = _block_file_lines(rng)
    path = tmp_path / "chat.jsonl"
    path.write_bytes(parsing._BOM + ending.join(lines))  # no line ending after the last line
    monkeypatch.setattr(parsing, "_BLOCK_BYTES", block_bytes)
    progress = []
    blocks = list(parse_file(path, fmt="openai", progress=lambda done, total: progress.append((done, total))))
    monkeypatch.setattr(  # line by line, typed and orjson fast paths included
        parsing,
        "_parse_chat_lines",
        lambda fh, fmt, opts: parsing._parse_json_units(
            parsing._iter_lines(fh, opts.max_line_bytes, opts.progress), fmt, opts, False
        ),
    )
    by_line = list(parse_file(path, fmt="openai"))
    assert [type(item) for item in blocks] == [type(item) for item in by_line]
    assert blocks == by_line
    monkeypatch.setattr(parsing._OpenAIFormat, "fast_record", None)
    general = list(parse_file(path, fmt="openai"))
    assert blocks == general
    assert {item.code for item in blocks if isinstance(item, Rejection)} >= {
        "invalid_json",
        "not_starting_user",
        "empty_content",
        "encoding",
        "unknown_split",
    }
    assert sum(isinstance(item, Record) for item in blocks) > 500
    assert progress[-1] == (path.stat().st_size, path.stat().st_size)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_clean_chat_file_is_read_in_blocks(tmp_path, monkeypatch):
    """A file of plain chat lines never goes line by line, and its records carry the right numbers."""
    path = tmp_path / "clean.jsonl"
    row = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "tags": ["t"],
    }
    path.write_bytes(
        b"".join(json.dumps({**row, "split": s}).encode() + b"\n" for s in ["train", "eval"] * 3000)
    )
    monkeypatch.setattr(parsing, "_BLOCK_BYTES", 4096)

    def no_lines(*args, **kwargs):
        raise AssertionError("a clean file went line by line")

    monkeypatch.setattr(parsing, "_parse_json_unit", no_lines)
    records = list(parse_file(path, fmt="openai"))
    assert [r.line for r in records] == list(range(1, 6001))
    assert all(type(r) is parsing.JsonRecord for r in records)
    assert [r.split for r in records[:4]] == ["train", "eval", "train", "eval"]
    assert records[0].tags == ["t"] and records[0].messages == row["messages"]


@pytest.mark.parametrize("block_bytes", [512, 64 * 1024])  # the line longer than a block, or inside one
def test_over_long_line_in_a_chat_block_file(tmp_path, monkeypatch, block_bytes):
    """A line over the limit inside a file of plain chat lines is rejected as too long, with its line
    number, without being held whole; the lines after it are read as usual."""
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    long = b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\n".join([good] * 50 + [long] + [good] * 50) + b"\n")
    monkeypatch.setattr(parsing, "_BLOCK_BYTES", block_bytes)
    items = list(parse_file(path, fmt="openai", max_line_bytes=1000))
    assert [item.line for item in items] == list(range(1, 102))
    assert isinstance(items[50], Rejection) and items[50].code == "line_too_long" and items[50].line == 51
    assert all(isinstance(item, Record) for i, item in enumerate(items) if i != 50)
