"""Streaming parsers for uploaded conversation datasets.

Curators upload JSON Lines, JSON array or CSV files (up to a few hundred MB) in one of
several common fine-tuning formats.  This module turns such a file into a stream of
normalised :class:`Record` objects and :class:`Rejection` objects, one per input record,
with exact 1-based line numbers and plain-English reasons that say what to fix.

Design notes:

* Pure Python, no Django imports: the import service, the upload form and the example
  editor all build on this module.
* Never reads a whole file: JSON Lines and CSV files are read line by line with a bounded
  ``readline`` (over-long lines are skipped in chunks up to the next newline), JSON array
  files are split into elements by an incremental scanner that reads fixed-size chunks.
  Memory use is bounded by ``max_line_bytes`` plus one read chunk.
* Whole-file problems (empty, binary, compressed, not UTF-8, unknown format, wrong kind,
  missing CSV columns) raise :class:`FileError` when :func:`parse_file` is called, before
  any record is produced; per-record problems become :class:`Rejection` objects.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice, pairwise
from pathlib import Path
from typing import IO, Any, ClassVar

import msgspec
import orjson

__all__ = [
    "FILE_ERROR_CODES",
    "FORMAT_KIND",
    "FORMAT_LABELS",
    "FORMATS",
    "KINDS",
    "MAX_DEPTH",
    "RAW_LIMIT",
    "REJECTION_CODES",
    "SPLITS",
    "CsvMapping",
    "FileError",
    "Record",
    "Rejection",
    "csv_columns",
    "detect_format",
    "guess_csv_mapping",
    "parse_file",
    "validate_messages",
    "validate_preference",
]

FORMATS = ("openai", "sharegpt", "alpaca", "csv", "preference")
KINDS = ("sft", "preference")
FORMAT_KIND = {"openai": "sft", "sharegpt": "sft", "alpaca": "sft", "csv": "sft", "preference": "preference"}
FORMAT_LABELS = {
    "openai": "OpenAI chat format",
    "sharegpt": "ShareGPT format",
    "alpaca": "Alpaca format",
    "csv": "CSV",
    "preference": "preference pairs",
}

MAX_DEPTH = 64  # deepest JSON nesting accepted in one record
RAW_LIMIT = 64 * 1024  # bytes of the original record kept on a Rejection
PROGRESS_STEP = 1024 * 1024  # report progress about every MiB
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024

REJECTION_CODES: dict[str, str] = {
    "invalid_json": "Invalid JSON",
    "not_object": "Not a JSON object",
    "encoding": "Not valid UTF-8",
    "nul_bytes": "Contains NUL bytes",
    "line_too_long": "Record too large",
    "too_deep": "Nested too deeply",
    "invalid_csv": "Malformed CSV row",
    "column_count": "Wrong number of CSV cells",
    "missing_field": "Missing field",
    "wrong_type": "Wrong type",
    "format_mismatch": "Different format",
    "empty_messages": "No messages",
    "unknown_role": "Unknown role",
    "content_not_string": "Content is not text",
    "empty_content": "Empty message",
    "system_not_first": "System message not first",
    "no_user": "No user message",
    "no_assistant": "No assistant reply",
    "not_starting_user": "Does not start with a user turn",
    "consecutive_roles": "Turns do not alternate",
    "not_ending_assistant": "Does not end with an assistant reply",
    "not_ending_user": "Prompt does not end with a user turn",
    "pair_mismatch": "Chosen/rejected conversations differ",
    "empty_chosen": "Empty chosen answer",
    "empty_rejected": "Empty rejected answer",
    "identical_pair": "Chosen equals rejected",
    "too_long": "Too many tokens",
    "template_refused": "Refused by the chat template",
    "unknown_split": "Unknown split",
}

# The splits a record may name in an optional top-level "split" field (as the studio's own export
# writes it): a re-imported export keeps its train/eval/golden assignment.
SPLITS = ("train", "eval", "golden")

FILE_ERROR_CODES: dict[str, str] = {
    "empty_file": "Empty file",
    "binary_file": "Not a text file",
    "compressed_file": "Compressed or archive file",
    "not_utf8": "Not UTF-8 text",
    "unknown_format": "Unknown format",
    "kind_mismatch": "Wrong dataset kind",
    "not_csv": "Not a CSV file",
    "missing_columns": "Missing CSV columns",
    "csv_mapping_required": "CSV column mapping needed",
}

_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1024 * 1024
_HEAD_BYTES = 64 * 1024
_DETECT_RECORDS = 10  # records tried when detecting the format
_CSV_DELIMITERS = (",", ";", "\t", "|")
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


# --------------------------------------------------------------------------- public types


@dataclass
class CsvMapping:
    """Which CSV columns hold the prompt, the response and (optionally) system prompt and tags."""

    prompt: str
    response: str
    system: str | None = None
    tags: str | None = None

    def columns(self) -> list[str]:
        return [c for c in (self.prompt, self.response, self.system, self.tags) if c is not None]


@dataclass
class Record:
    """A good example. For preference records ``messages`` holds the prompt turns."""

    line: int
    messages: list[dict]
    tags: list[str]
    chosen: str | None = None
    rejected: str | None = None
    split: str | None = None  # None: the dataset's default (train)


class JsonRecord(Record):
    """A Record from the typed fast path, whose messages arrive as the JSON text they are stored
    as: the import writes that text as it is, and ``messages`` decodes it only when read."""

    def __init__(self, line: int, messages_json: str, tags: list[str], split: str | None = None) -> None:
        self.line, self.messages_json, self.tags, self.split = line, messages_json, tags, split
        self.chosen = self.rejected = None

    @property
    def messages(self) -> list[dict]:  # type: ignore[override]
        return orjson.loads(self.messages_json)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        fields = ("line", "messages", "tags", "chosen", "rejected", "split")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Rejection:
    """A record that was not imported. ``raw`` is the original record (no line ending), max 64 KiB."""

    line: int
    code: str
    reason: str
    raw: bytes


class FileError(Exception):
    """A problem with the whole file; nothing from it can be imported."""

    def __init__(self, code: str, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.line = line

    def __repr__(self) -> str:
        return f"FileError({self.code!r}, {self.reason!r}, line={self.line!r})"


# --------------------------------------------------------------------------- small helpers


class _Reject(Exception):
    """Internal: one record is bad."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _describe(value: Any) -> str:
    """'a number (3)', 'null', 'a list', ... for reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_quote(value)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _quote(text: str, limit: int = 60) -> str:
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


def _key_list(obj: dict) -> str:
    keys = [_quote(str(k), 40) for k in islice(obj, 8)]
    if not keys:
        return "no keys at all"
    more = ", …" if len(obj) > 8 else ""
    return ("the key " if len(keys) == 1 else "the keys ") + ", ".join(keys) + more


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str, where: str) -> None:
    """Reject strings that UTF-8/PostgreSQL cannot store (NUL characters, lone surrogates)."""
    if "\x00" in text:
        raise _Reject("nul_bytes", f"{where} contains a NUL character (\\u0000); remove it.")
    if not text.isascii() and _SURROGATE.search(text):  # isascii() is O(1)
        raise _Reject(
            "encoding",
            f"{where} contains a broken \\ud800-\\udfff escape (half of a surrogate pair), "
            "which is not valid Unicode; fix or remove that character.",
        )


def text_problem(text: str, where: str) -> str | None:
    """Why ``text`` cannot be stored (a NUL character, a lone surrogate), naming ``where``; None if it can."""
    try:
        _check_text(text, where)
    except _Reject as exc:
        return exc.reason
    return None


def _too_deep(obj: dict | list, limit: int = MAX_DEPTH) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


# --------------------------------------------------------------------------- conversation rules


@dataclass(slots=True)
class _Turn:
    role: str
    content: str
    where: str  # how the source names this turn, e.g. "messages[2]" or 'column "answer"'
    content_where: str  # how the source names its text, e.g. "messages[2].content"


@dataclass(slots=True)
class _Example:
    turns: list[_Turn]
    tags: list[str]
    chosen: str | None = None
    rejected: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class _RoleScheme:
    """How one format spells messages: key names and accepted role values."""

    role_key: str
    content_key: str
    roles: dict[str, str]
    allowed: str


_OPENAI_SCHEME = _RoleScheme(
    "role",
    "content",
    {"system": "system", "user": "user", "assistant": "assistant"},
    "system, user, assistant",
)
_SHAREGPT_SCHEME = _RoleScheme(
    "from",
    "value",
    {
        "system": "system",
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "chatgpt": "assistant",
        "bot": "assistant",
        "model": "assistant",
    },
    "human, user, gpt, assistant, chatgpt, bot, model, system",
)


def _read_turns(items: Any, name: str, scheme: _RoleScheme) -> list[_Turn]:
    """Check the structure of a message list and normalise roles (content checks come later)."""
    if not isinstance(items, list):
        raise _Reject("wrong_type", f'"{name}" must be a list of messages, but it is {_describe(items)}.')
    if not items:
        raise _Reject("empty_messages", f'"{name}" is an empty list; add the conversation turns.')
    rk, ck = scheme.role_key, scheme.content_key
    turns = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise _Reject(
                "wrong_type",
                f'{where} must be an object like {{"{rk}": "...", "{ck}": "..."}}, but it is {_describe(item)}.',
            )
        if rk not in item:
            raise _Reject("missing_field", f'{where} has no "{rk}" field; add one ({scheme.allowed}).')
        raw_role = item[rk]
        if not isinstance(raw_role, str):
            raise _Reject(
                "wrong_type",
                f"{where}.{rk} must be a string ({scheme.allowed}), but it is {_describe(raw_role)}.",
            )
        role = scheme.roles.get(raw_role.strip().lower())
        if role is None:
            raise _Reject(
                "unknown_role",
                f"{where}.{rk} is {_quote(raw_role)}; allowed {'roles' if rk == 'role' else 'values'} are "
                f"{scheme.allowed}. Remove that turn (tool and function turns are not supported) or drop the example.",
            )
        if ck not in item:
            raise _Reject("missing_field", f'{where} has no "{ck}" field; add the message text.')
        content = item[ck]
        if not isinstance(content, str):
            hint = (
                " Multi-part content is not supported; put the text in a single string."
                if isinstance(content, list)
                else ""
            )
            raise _Reject(
                "content_not_string", f"{where}.{ck} must be a string, but it is {_describe(content)}.{hint}"
            )
        _check_text(content, f"{where}.{ck}")
        turns.append(_Turn(role, content, where, f"{where}.{ck}"))
    return turns


def _check_not_empty(text: str, where: str) -> None:
    if not text.strip():
        raise _Reject(
            "empty_content",
            f"{where} is empty{' (only whitespace)' if text else ''}; write the text or remove this example.",
        )


def _check_conversation(turns: list[_Turn], final_role: str) -> None:
    """Conversation-level rules shared by every format.

    ``final_role`` is "assistant" for training conversations and "user" for preference prompts.
    """
    for turn in turns:
        _check_not_empty(turn.content, turn.content_where)
    for i, turn in enumerate(turns):
        if turn.role == "system" and i:
            raise _Reject(
                "system_not_first",
                f"{turn.where} is a system message, but a system message is only allowed as the very first "
                "turn. Move it to the start (merge several system messages into one).",
            )
    dialogue = turns[1:] if turns and turns[0].role == "system" else turns
    if not any(t.role == "user" for t in dialogue):
        raise _Reject("no_user", "There is no user turn; add the user's message.")
    if final_role == "assistant" and not any(t.role == "assistant" for t in dialogue):
        raise _Reject("no_assistant", "There is no assistant reply; add the answer the model should learn.")
    if dialogue[0].role != "user":
        raise _Reject(
            "not_starting_user",
            f"{dialogue[0].where} is an assistant turn, but the conversation must start with a user turn "
            "(after an optional system message). Remove the opening assistant message or move it into the system prompt.",
        )
    for prev, cur in pairwise(dialogue):
        if prev.role == cur.role:
            raise _Reject(
                "consecutive_roles",
                f"{prev.where} and {cur.where} are both {cur.role} turns; user and assistant turns must "
                "alternate. Merge them into one message or remove one.",
            )
    last = dialogue[-1]
    if last.role != final_role:
        if final_role == "assistant":
            raise _Reject(
                "not_ending_assistant",
                f"The conversation ends with a user turn ({last.where}); it must end with the assistant reply "
                "the model should learn. Add the reply or remove the trailing user message.",
            )
        raise _Reject(
            "not_ending_user",
            f"The prompt ends with an assistant turn ({last.where}); it must end with the user turn that "
            '"chosen" and "rejected" answer. Move that message into chosen/rejected or remove it.',
        )


def _check_pair(chosen: str, rejected: str) -> None:
    if not chosen.strip():
        raise _Reject(
            "empty_chosen", "The chosen answer is empty; write the preferred answer or drop this pair."
        )
    if not rejected.strip():
        raise _Reject(
            "empty_rejected", "The rejected answer is empty; write the worse answer or drop this pair."
        )
    if chosen.strip() == rejected.strip():
        raise _Reject(
            "identical_pair",
            "The chosen and rejected answers are identical, so the pair teaches nothing; "
            "make the rejected answer the worse alternative or drop this pair.",
        )


def validate_messages(messages: Any, *, kind: str = "sft") -> tuple[str, str] | None:
    """Check an OpenAI-style message list; return ``(code, reason)`` or ``None`` when it is fine.

    ``kind="sft"``: a full training conversation (must end with an assistant reply).
    ``kind="preference"``: the prompt turns of a preference pair (must end with a user turn).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    try:
        turns = _read_turns(messages, "messages", _OPENAI_SCHEME)
        _check_conversation(turns, "assistant" if kind == "sft" else "user")
    except _Reject as problem:
        return problem.code, problem.reason
    return None


def validate_preference(prompt: Any, chosen: Any, rejected: Any) -> tuple[str, str] | None:
    """Check an edited preference example: prompt messages plus chosen/rejected strings."""
    problem = validate_messages(prompt, kind="preference")
    if problem:
        return problem
    try:
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise _Reject("wrong_type", f'"{name}" must be a string, but it is {_describe(value)}.')
            _check_text(value, f'"{name}"')
        _check_pair(chosen, rejected)
    except _Reject as problem:
        return problem.code, problem.reason
    return None


def _read_tags(value: Any) -> list[str]:
    """Tags are optional; a list of strings, stripped, empty ones dropped, duplicates removed (case kept)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Reject(
            "wrong_type",
            f'"tags" must be a list of strings like ["billing", "refunds"], but it is {_describe(value)}.',
        )
    tags: dict[str, None] = {}
    for i, tag in enumerate(value):
        if not isinstance(tag, str):
            raise _Reject("wrong_type", f"tags[{i}] is {_describe(tag)}; every tag must be a string.")
        _check_text(tag, f"tags[{i}]")
        if tag.strip():
            tags[tag.strip()] = None
    return list(tags)


def _read_split(value: Any) -> str | None:
    """The optional "split" field: train, eval or golden (any case), or absent/null."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in SPLITS:
        return value.strip().lower()
    shown = f'"{value[:40]}"' if isinstance(value, str) else _describe(value)
    raise _Reject(
        "unknown_split",
        f'"split" is {shown}; it must be "train", "eval" or "golden". Correct it, or remove the field to '
        "import the record into the train split.",
    )


def _split_tags(cell: str) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in re.split(r"[,;]", cell) if t.strip()))


# --------------------------------------------------------------------------- JSON formats

_FORMAT_EXAMPLES = {
    "openai": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "", "output": "..."}',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
}


def _guess_format(obj: dict) -> tuple[str, str] | None:
    """(format, the key that gave it away) for a decoded JSON record, or None."""
    for key, fmt in (("chosen", "preference"), ("rejected", "preference"), ("messages", "openai")):
        if key in obj:
            return fmt, key
    if "conversations" in obj:
        return "sharegpt", "conversations"
    if "instruction" in obj:
        return "alpaca", "instruction"
    if "output" in obj and "input" in obj:
        return "alpaca", "output"
    return None


def _require(obj: dict, key: str, fmt: str) -> Any:
    if key not in obj:
        raise _Reject(
            "missing_field",
            f'No "{key}" field: this record has {_key_list(obj)}. '
            f"Each record in this {FORMAT_LABELS[fmt]} file must look like {_FORMAT_EXAMPLES[fmt]}.",
        )
    return obj[key]


def _optional_text(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Reject("content_not_string", f'"{key}" must be a string, but it is {_describe(value)}.')
    _check_text(value, f'"{key}"')
    return value


def _required_text(obj: dict, key: str, fmt: str) -> str:
    _require(obj, key, fmt)
    value = _optional_text(obj, key)
    if value is None:
        raise _Reject("content_not_string", f'"{key}" must be a string, but it is null.')
    return value


class _JsonFormat(ABC):
    """Turns one decoded JSON object into an :class:`_Example` (or raises :class:`_Reject`)."""

    name: ClassVar[str]

    def normalise(self, obj: dict) -> _Example:
        guess = _guess_format(obj)
        if guess is not None and guess[0] != self.name:
            other, key = guess
            raise _Reject(
                "format_mismatch",
                f'This record looks like {FORMAT_LABELS[other]} (it has "{key}"), but the file was detected as '
                f"{FORMAT_LABELS[self.name]} from its first record. Put each format in its own file, or convert "
                f"this record to {_FORMAT_EXAMPLES[self.name]}.",
            )
        return self._normalise(obj)

    @abstractmethod
    def _normalise(self, obj: dict) -> _Example:
        """Format-specific part of :meth:`normalise`."""


def _holds_containers(obj: dict, skip: tuple[str, ...]) -> bool:
    return any(type(v) is dict or type(v) is list for k, v in obj.items() if k not in skip)


class _TypedTurn(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


class _TypedChat(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[_TypedTurn]
    tags: list[str] = []
    split: str | None = None


_TYPED_CHAT = msgspec.json.Decoder(_TypedChat)
_ENCODE = msgspec.json.Encoder().encode


def _plain_content(text: str) -> bool:
    """Content the general path takes as it is: not blank, no NUL, no lone surrogate."""
    return (
        bool(text)
        and not text.isspace()
        and "\x00" not in text
        and (text.isascii() or not _SURROGATE.search(text))
    )


def _typed_record(data: bytes, line: int) -> JsonRecord | None:
    """The most common line, ``{"messages": [{"role", "content"}...], "tags"?: [str...]}`` with no
    other key, decoded straight into typed structs (msgspec checks the shape and the types in C) and
    its messages encoded back to the JSON text that is stored: no dict per message is built. Same
    checks and results as ``fast_record``; anything else (another key, another type, a problem to
    report) returns None."""
    if b"\x00" in data:
        return None
    try:
        chat = _TYPED_CHAT.decode(data)
    except (msgspec.DecodeError, ValueError):  # ValueError: bytes that are not UTF-8
        return None
    return _typed_chat_record(chat, line)


def _typed_chat_record(chat: _TypedChat, line: int) -> JsonRecord | None:
    """The record of a decoded plain chat line, or None when the general path must judge it."""
    expect, dialogue, first = "user", 0, True
    for turn in chat.messages:
        role, content = turn.role, turn.content
        if role == expect:
            expect = "assistant" if expect == "user" else "user"
            dialogue += 1
        elif role != "system" or not first:
            return None
        first = False
        # _plain_content, inlined: this runs for every message of a file
        if not content or content.isspace() or "\x00" in content:
            return None
        if not content.isascii() and _SURROGATE.search(content):
            return None
    if not dialogue or expect != "user" or (chat.split is not None and chat.split not in SPLITS):
        return None
    tags = chat.tags
    if tags and (len(tags) > 1 or tags[0] != tags[0].strip() or "\x00" in tags[0] or not tags[0].isascii()):
        kept: dict[str, None] = {}
        for tag in tags:
            if "\x00" in tag or (not tag.isascii() and _SURROGATE.search(tag)):
                return None
            if tag := tag.strip():
                kept[tag] = None
        tags = list(kept)
    elif tags and not tags[0]:  # one empty tag
        tags = []
    return JsonRecord(line, _ENCODE(chat.messages).decode("utf-8"), tags, chat.split)


class _OpenAIFormat(_JsonFormat):
    name = "openai"

    @staticmethod
    def fast_record(data: bytes, line: int) -> Record | None:
        """The record of a plainly valid line, or None to take the general path.

        Only for records the general path would accept unchanged (exact role names, alternating
        turns, string tags), so the result is always the same as ``_finish(normalise(...))``; any
        doubt (orjson refusing the text, unusual roles, a problem to report) returns None. The
        typed path goes first; this one takes the lines it leaves (extra keys, ``"tags": null``).
        """
        if record := _typed_record(data, line):
            return record
        if b"\x00" in data:
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if type(obj) is not dict or "chosen" in obj or "rejected" in obj:
            return None
        items, tags, split = obj.get("messages"), obj.get("tags"), obj.get("split")
        if type(items) is not list or (split is not None and split not in SPLITS):
            return None
        if len(obj) > 1 + ("tags" in obj) and _holds_containers(obj, ("messages", "tags")):
            return None  # extra keys holding lists/objects: leave the nesting check to the general path
        messages = []
        expect, dialogue = "user", 0
        for item in items:
            if type(item) is not dict:
                return None
            role, content = item.get("role"), item.get("content")
            if type(role) is not str or type(content) is not str:
                return None
            if len(item) > 2 and _holds_containers(item, ("role", "content")):
                return None
            if role == expect:
                expect = "assistant" if expect == "user" else "user"
                dialogue += 1
            elif role != "system" or messages:
                return None
            if not _plain_content(content):
                return None
            messages.append({"role": role, "content": content})
        if not dialogue or expect != "user":
            return None
        if tags is None:
            return Record(line, messages, [], split=split)
        if type(tags) is not list:
            return None
        kept: dict[str, None] = {}
        for tag in tags:
            if type(tag) is not str or "\x00" in tag or (not tag.isascii() and _SURROGATE.search(tag)):
                return None
            if tag := tag.strip():
                kept[tag] = None
        return Record(line, messages, list(kept), split=split)

    def _normalise(self, obj: dict) -> _Example:
        turns = _read_turns(_require(obj, "messages", self.name), "messages", _OPENAI_SCHEME)
        _check_conversation(turns, "assistant")
        return _Example(turns, _read_tags(obj.get("tags")))


class _ShareGPTFormat(_JsonFormat):
    name = "sharegpt"

    def _normalise(self, obj: dict) -> _Example:
        turns = _read_turns(_require(obj, "conversations", self.name), "conversations", _SHAREGPT_SCHEME)
        system = _optional_text(obj, "system")  # LLaMA-Factory style top-level system prompt
        if system and system.strip():
            turns.insert(0, _Turn("system", system, '"system"', '"system"'))
        _check_conversation(turns, "assistant")
        return _Example(turns, _read_tags(obj.get("tags")))


class _AlpacaFormat(_JsonFormat):
    name = "alpaca"

    def _normalise(self, obj: dict) -> _Example:
        instruction = _required_text(obj, "instruction", self.name)
        _check_not_empty(instruction, '"instruction"')  # before the input is appended to it
        output = _required_text(obj, "output", self.name)
        extra_input = _optional_text(obj, "input")
        system = _optional_text(obj, "system")
        prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
        turns = [_Turn("system", system, '"system"', '"system"')] if system and system.strip() else []
        turns.append(_Turn("user", prompt, '"instruction"', '"instruction"'))
        turns.append(_Turn("assistant", output, '"output"', '"output"'))
        _check_conversation(turns, "assistant")
        return _Example(turns, _read_tags(obj.get("tags")))


class _PreferenceFormat(_JsonFormat):
    """``prompt`` (string or messages) or ``messages``, plus ``chosen``/``rejected``.

    ``chosen``/``rejected`` may be strings or TRL conversational lists ending with an assistant
    message; without an explicit prompt, the turns they share before that message are the prompt.
    """

    name = "preference"

    def _normalise(self, obj: dict) -> _Example:
        chosen_value = _require(obj, "chosen", self.name)
        rejected_value = _require(obj, "rejected", self.name)
        prompt = self._prompt(obj)
        chosen_prefix, chosen = self._answer(chosen_value, "chosen")
        rejected_prefix, rejected = self._answer(rejected_value, "rejected")
        if prompt is None:
            if not chosen_prefix:
                raise _Reject(
                    "missing_field",
                    f'No "prompt" field: this record has {_key_list(obj)}. Add "prompt" (a string or a list of '
                    'messages), or give "chosen" and "rejected" as whole conversations that share the same opening turns.',
                )
            if not _same_turns(chosen_prefix, rejected_prefix):
                raise _Reject(
                    "pair_mismatch",
                    '"chosen" and "rejected" must contain the same conversation before their final assistant '
                    "message, but they differ. Make the earlier turns identical or give an explicit prompt.",
                )
            prompt = chosen_prefix
        else:
            for name, prefix in (("chosen", chosen_prefix), ("rejected", rejected_prefix)):
                if prefix and not _same_turns(prefix, prompt):
                    raise _Reject(
                        "pair_mismatch",
                        f'"{name}" repeats conversation turns that differ from the prompt. Give only the final '
                        f'assistant message in "{name}", or make its earlier turns identical to the prompt.',
                    )
        _check_conversation(prompt, "user")
        _check_pair(chosen, rejected)
        return _Example(prompt, _read_tags(obj.get("tags")), chosen, rejected)

    @staticmethod
    def _prompt(obj: dict) -> list[_Turn] | None:
        if "prompt" in obj:
            value = obj["prompt"]
            if isinstance(value, str):
                _check_text(value, '"prompt"')
                return [_Turn("user", value, '"prompt"', '"prompt"')]
            if isinstance(value, list):
                return _read_turns(value, "prompt", _OPENAI_SCHEME)
            raise _Reject(
                "wrong_type",
                f'"prompt" must be a string or a list of messages, but it is {_describe(value)}.',
            )
        if "messages" in obj:
            return _read_turns(obj["messages"], "messages", _OPENAI_SCHEME)
        return None

    @staticmethod
    def _answer(value: Any, name: str) -> tuple[list[_Turn], str]:
        """(turns before the answer, answer text) for a chosen/rejected value."""
        if isinstance(value, str):
            _check_text(value, f'"{name}"')
            return [], value
        if isinstance(value, list):
            if not value:
                raise _Reject(f"empty_{name}", f'"{name}" is an empty list; give the {name} answer.')
            turns = _read_turns(value, name, _OPENAI_SCHEME)
            last = turns[-1]
            if last.role != "assistant":
                raise _Reject(
                    "not_ending_assistant",
                    f'"{name}" must end with an assistant message (the answer), but {last.where} is a {last.role} turn.',
                )
            return turns[:-1], last.content
        raise _Reject(
            "wrong_type", f'"{name}" must be a string or a list of messages, but it is {_describe(value)}.'
        )


def _same_turns(a: list[_Turn], b: list[_Turn]) -> bool:
    return [(t.role, t.content) for t in a] == [(t.role, t.content) for t in b]


_JSON_FORMATS: dict[str, _JsonFormat] = {
    f.name: f for f in (_OpenAIFormat(), _ShareGPTFormat(), _AlpacaFormat(), _PreferenceFormat())
}


# --------------------------------------------------------------------------- CSV format


@dataclass(frozen=True)
class _CsvHeader:
    line: int
    delimiter: str
    columns: list[str]


class _CsvRows:
    """Turns CSV rows into examples according to a :class:`CsvMapping`."""

    def __init__(self, header: _CsvHeader, mapping: CsvMapping) -> None:
        self._width = len(header.columns)
        self._delimiter = _DELIMITER_NAMES[header.delimiter]
        index = {}
        for i, name in enumerate(header.columns):
            index.setdefault(name, i)
        self._prompt = index[mapping.prompt.strip()]
        self._response = index[mapping.response.strip()]
        self._system = index[mapping.system.strip()] if mapping.system else None
        self._tags = index[mapping.tags.strip()] if mapping.tags else None
        self._names = header.columns

    def normalise(self, row: list[str]) -> _Example:
        if len(row) < self._width or any(cell.strip() for cell in row[self._width :]):
            raise _Reject(
                "column_count",
                f"This row has {len(row)} cells but the header has {self._width} columns. A cell probably "
                f"contains an unquoted {self._delimiter} or line break; wrap such cells in double quotes.",
            )
        turns = []
        if self._system is not None and row[self._system].strip():
            turns.append(self._turn("system", self._system, row))
        turns.append(self._turn("user", self._prompt, row))
        turns.append(self._turn("assistant", self._response, row))
        _check_conversation(turns, "assistant")
        tags = _split_tags(row[self._tags]) if self._tags is not None else []
        return _Example(turns, tags)

    def _turn(self, role: str, index: int, row: list[str]) -> _Turn:
        where = f"column {_quote(self._names[index])}"
        return _Turn(role, row[index], where, where)


def guess_csv_mapping(columns: Iterable[str]) -> CsvMapping | None:
    """A mapping guessed from common column names, or None when prompt/response cannot be guessed."""
    by_name = {c.strip().lower(): c.strip() for c in columns}

    def pick(*candidates: str) -> str | None:
        return next((by_name[c] for c in candidates if c in by_name), None)

    prompt = pick("prompt", "question", "instruction", "input", "user", "query", "customer", "request")
    response = pick("response", "answer", "output", "completion", "assistant", "reply", "agent")
    if prompt is None or response is None or prompt == response:
        return None
    return CsvMapping(
        prompt, response, pick("system", "system_prompt", "system prompt"), pick("tags", "tag", "labels")
    )


def _parse_header(text: str) -> tuple[str, list[str]]:
    """(delimiter, columns) of a CSV header line; the delimiter giving the most columns wins."""
    best = (",", [text])
    for delimiter in _CSV_DELIMITERS:
        try:
            columns = next(csv.reader([text], delimiter=delimiter, strict=True), [])
        except csv.Error:
            continue
        if len(columns) > len(best[1]):
            best = (delimiter, columns)
    return best[0], [c.strip() for c in best[1]]


# --------------------------------------------------------------------------- reading bytes


@dataclass(slots=True)
class _Unit:
    """One physical line (JSON Lines, CSV) or one array element, as bytes without the line ending."""

    line: int
    data: bytes
    offset: int  # file offset of data[0]
    size: int  # full size in bytes (data may be cut to RAW_LIMIT when there is a problem)
    problem: str | None = None  # "too_long", "truncated" or "trailing"


class _Progress:
    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self._callback = callback
        self._total = total
        self._done = 0
        self._next = PROGRESS_STEP

    def advance(self, n: int) -> None:
        self._done += n
        if self._callback is not None and self._done >= self._next:
            self._callback(min(self._done, self._total), self._total)
            self._next = self._done + PROGRESS_STEP

    def finish(self) -> None:
        if self._callback is not None:
            self._callback(self._total, self._total)


def _iter_lines(
    fh: IO[bytes], max_line_bytes: int, progress: _Progress | None = None, number: int = 0, offset: int = 0
) -> Iterator[_Unit]:
    """Lines of a binary file with bounded memory; over-long lines are skipped chunk by chunk.
    ``number`` and ``offset``: lines and bytes before where ``fh`` reads from."""
    limit = max_line_bytes + 2  # room for "\r\n"
    readline = fh.readline
    while chunk := readline(limit):
        number += 1
        start = offset
        offset += len(chunk)
        if progress:
            progress.advance(len(chunk))
        skip = 3 if start == 0 and chunk.startswith(_BOM) else 0
        if chunk.endswith(b"\n") or len(chunk) < limit:
            end = len(chunk) - (chunk.endswith(b"\n") + chunk.endswith(b"\r\n"))
            if end - skip <= max_line_bytes:
                yield _Unit(number, chunk[skip:end], start + skip, end - skip)
                continue
        head = chunk[skip : skip + RAW_LIMIT]
        while not chunk.endswith(b"\n") and (chunk := readline(_READ_CHUNK)):
            offset += len(chunk)
            if progress:
                progress.advance(len(chunk))
        yield _Unit(number, head, start + skip, offset - start - skip, "too_long")


# Skips everything that is not structure (including whole strings) in one match, then captures
# either a structural character (group 1) or the start of a string cut off by the buffer end (group 2).
_TOKEN = re.compile(
    rb'(?:[^"\[\]{},]++|"(?:[^"\\]++|\\.)*+")*+(?:([\[\]{},])|("(?:[^"\\]++|\\.)*+))?', re.DOTALL
)
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+("?)', re.DOTALL)  # the rest of a cut-off string
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_COMMA, _CLOSE_ARRAY = ord(","), ord("]")
_OPENERS = frozenset(b"[{")


@dataclass(slots=True)
class _Oversize:
    line: int
    offset: int
    head: bytes


class _ArrayElements:
    """Splits a top-level JSON array into element units, reading bounded chunks.

    A small tokenizer (strings are skipped by one regex match) tracks nesting depth, so element
    boundaries are found even when an element is not valid JSON: one bad element does not
    spoil the rest of the file.  An element larger than ``max_bytes`` is skipped without being
    held in memory.
    """

    def __init__(self, fh: IO[bytes], max_bytes: int, progress: _Progress | None = None) -> None:
        self._fh = fh
        self._max = max_bytes
        self._progress = progress
        self._buf = b""
        self._base = 0  # file offset of _buf[0]
        self._mark = 0  # line-number cursor: _buf[_mark] is on line _mark_line
        self._mark_line = 1

    def _line_at(self, pos: int) -> int:
        self._mark_line += self._buf.count(b"\n", self._mark, pos)
        self._mark = pos
        return self._mark_line

    def _fill(self, keep_from: int) -> bool:
        """Drop ``_buf[:keep_from]`` and append the next chunk; False at end of file."""
        self._line_at(keep_from)
        chunk = self._fh.read(_READ_CHUNK)
        if self._progress:
            self._progress.advance(len(chunk))
        self._buf = self._buf[keep_from:] + chunk
        self._base += keep_from
        self._mark -= keep_from
        return bool(chunk)

    def _element(self, start: int, end: int, big: _Oversize | None) -> _Unit | None:
        if big is not None:
            return _Unit(big.line, big.head, big.offset, self._base + end - big.offset, "too_long")
        found = _NON_SPACE.search(self._buf, start, end)
        if found is None:
            return None  # empty slot, e.g. a trailing comma
        data = self._buf[found.start() : end].rstrip()
        line = self._line_at(found.start())
        if len(data) > self._max:
            return _Unit(line, data[:RAW_LIMIT], self._base + found.start(), len(data), "too_long")
        return _Unit(line, data, self._base + found.start(), len(data))

    def __iter__(self) -> Iterator[_Unit]:
        self._buf = self._fh.read(len(_BOM))
        if self._progress:
            self._progress.advance(len(self._buf))
        if self._buf == _BOM:
            self._buf, self._base = b"", len(_BOM)
        pos = 0
        while (found := _NON_SPACE.search(self._buf, pos)) is None:
            pos = len(self._buf)
            if not self._fill(pos):
                return
            pos = 0
        if self._buf[found.start()] != ord("["):
            yield from self._trailing(found.start())
            return
        pos = seg = found.end()  # seg: where the current element's slot starts
        depth = 0
        in_string = False
        big: _Oversize | None = None
        while True:
            buf = self._buf
            if in_string:
                rest = _STRING_REST.match(buf, pos)
                pos, in_string = rest.end(), not rest.group(1)
            while not in_string:
                token = _TOKEN.match(buf, pos)
                pos = token.end()
                if token.lastindex != 1:  # end of buffer, possibly inside a string
                    in_string = token.lastindex == 2
                    break
                char = buf[pos - 1]
                if char in _OPENERS:
                    depth += 1
                elif char == _COMMA:
                    if depth == 0:
                        if unit := self._element(seg, pos - 1, big):
                            yield unit
                        big, seg = None, pos
                elif depth:
                    depth -= 1
                elif char == _CLOSE_ARRAY:
                    if unit := self._element(seg, pos - 1, big):
                        yield unit
                    yield from self._trailing(pos)
                    return
            if big is None and len(buf) - seg > self._max:
                found = _NON_SPACE.search(buf, seg)
                if found is None:  # a long run of whitespace between elements
                    seg = len(buf)
                else:
                    start = found.start()
                    big = _Oversize(self._line_at(start), self._base + start, buf[start : start + RAW_LIMIT])
            keep = pos if big is not None else seg
            more = self._fill(keep)
            pos -= keep
            seg = 0 if big is not None else seg - keep
            if not more:
                yield from self._unfinished(seg, depth, in_string, big)
                return

    def _unfinished(self, seg: int, depth: int, in_string: bool, big: _Oversize | None) -> Iterator[_Unit]:
        """The file ended inside the array."""
        if big is not None:
            yield _Unit(big.line, big.head, big.offset, self._base + len(self._buf) - big.offset, "truncated")
            return
        unit = self._element(seg, len(self._buf), None)
        if unit is None:
            return
        if depth or in_string:  # the last element itself is cut off
            unit.data, unit.problem = unit.data[:RAW_LIMIT], "truncated"
        yield unit  # otherwise the element is whole; only the closing "]" is missing

    def _trailing(self, pos: int) -> Iterator[_Unit]:
        """Anything but whitespace after the array is reported once; reading stops there."""
        while (found := _NON_SPACE.search(self._buf, pos)) is None:
            pos = len(self._buf)
            if not self._fill(pos):
                return
            pos = 0
        data = self._buf[found.start() : found.start() + RAW_LIMIT]
        yield _Unit(self._line_at(found.start()), data, self._base + found.start(), len(data), "trailing")


# --------------------------------------------------------------------------- record decoding


def _load_json_object(unit: _Unit, in_array: bool, errors: str = "strict") -> dict:
    data = unit.data
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _Reject(
            "nul_bytes",
            f"This {'record' if in_array else 'line'} contains a NUL byte (0x00) at byte {nul + 1}. Remove NUL "
            "bytes; they usually come from binary data or a UTF-16 export.",
        )
    try:
        text = data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        raise _encoding_reject(unit, exc, "byte {} of this record" if in_array else "column {}")
    try:
        obj = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        if in_array:
            line = unit.line + exc.lineno - 1
            where = (
                f"line {line}, column {exc.colno}"
                if exc.lineno > 1
                else f"line {line}, character {exc.pos + 1}"
            )
            advice = "Check for a missing comma or quote, or an unescaped quote or backslash inside a string."
        else:
            where = f"column {exc.colno}"
            advice = (
                "Each line must be one complete JSON object: check for a missing comma or quote, an unescaped "
                "quote or backslash inside a string, or a record split across several lines."
            )
        raise _Reject("invalid_json", f"Invalid JSON at {where}: {exc.msg}. {advice}")
    except ValueError:  # Python's cap on integer digits (sys.get_int_max_str_digits): not JSON syntax
        raise _Reject(
            "invalid_json",
            f"This {'record' if in_array else 'line'} holds an integer with more than "
            f"{sys.get_int_max_str_digits()} digits, which cannot be read. Remove or shorten the number.",
        ) from None
    except RecursionError:  # json's own recursion guard: far deeper than MAX_DEPTH
        raise _too_deep_reject()
    if isinstance(obj, dict | list) and data.count(b"[") + data.count(b"{") > MAX_DEPTH and _too_deep(obj):
        raise _too_deep_reject()
    if not isinstance(obj, dict):
        raise _Reject(
            "not_object",
            f"This {'record' if in_array else 'line'} is {_describe(obj)}, not a JSON object; each record must be "
            "a JSON object {...}.",
        )
    return obj


def _too_deep_reject() -> _Reject:
    return _Reject(
        "too_deep",
        f"The JSON is nested more than {MAX_DEPTH} levels deep; conversations never need that. "
        "Flatten the structure or remove this record.",
    )


def _encoding_reject(unit: _Unit, exc: UnicodeDecodeError, where: str) -> _Reject:
    """``where`` is a template for the 1-based position, e.g. "column {}"."""
    bad = unit.data[exc.start]
    return _Reject(
        "encoding",
        f"Byte 0x{bad:02X} at {where.format(exc.start + 1)} (file offset {unit.offset + exc.start}) is not valid "
        "UTF-8. Re-save the file as UTF-8 (in Excel: \u201cCSV UTF-8\u201d; in text editors: \u201cSave with "
        "encoding \u2192 UTF-8\u201d) and upload it again.",
    )


def _unit_problem(unit: _Unit, max_line_bytes: int, in_array: bool) -> _Reject:
    """Reason for a unit the reader could not deliver whole."""
    what = "record" if in_array else "line"
    if unit.problem == "too_long":
        return _Reject(
            "line_too_long",
            f"This {what} is {_human_bytes(unit.size)} ({unit.size:,} bytes), more than the "
            f"{_human_bytes(max_line_bytes)} limit. Shorten or split the conversation; if it is not meant to "
            f"be this long, look for a missing line break or closing quote.",
        )
    if unit.problem == "truncated":
        return _Reject(
            "invalid_json",
            "The file ends in the middle of this record (an unterminated string, object or list); "
            "the upload may have been cut short. Check the end of the file.",
        )
    return _Reject(
        "invalid_json",
        "Unexpected content after the closing ] of the JSON array. A JSON array file must hold a "
        "single array; remove the extra content or move it inside the array.",
    )


# --------------------------------------------------------------------------- file checks & detection

_SUPPORTED = "Upload a JSON Lines (.jsonl), JSON array (.json) or CSV file."
_SIGNATURE_LIST: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "binary_file", f"This is a PNG image, not a text file. {_SUPPORTED}"),
    (b"\xff\xd8\xff", "binary_file", f"This is a JPEG image, not a text file. {_SUPPORTED}"),
    (b"GIF8", "binary_file", f"This is a GIF image, not a text file. {_SUPPORTED}"),
    (b"%PDF-", "binary_file", f"This is a PDF document, not a data file. {_SUPPORTED}"),
    (b"SQLite format 3\x00", "binary_file", f"This is an SQLite database, not a data file. {_SUPPORTED}"),
    (
        b"PAR1",
        "binary_file",
        "This is a Parquet file; export it to JSON Lines (one JSON object per line) first.",
    ),
    (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        "binary_file",
        "This is a legacy Microsoft Office file (.xls/.doc); save the sheet as \u201cCSV UTF-8\u201d.",
    ),
    (
        b"PK\x03\x04",
        "compressed_file",
        "This is a ZIP archive (Excel .xlsx and Word .docx files are ZIP archives too). Extract it, or save "
        "the spreadsheet as \u201cCSV UTF-8\u201d, and upload the result.",
    ),
    (b"PK\x05\x06", "compressed_file", f"This is an empty ZIP archive. {_SUPPORTED}"),
    (
        b"\x1f\x8b",
        "compressed_file",
        "This file is gzip-compressed; decompress it (gunzip) and upload the file inside.",
    ),
    (
        b"\xfd7zXZ\x00",
        "compressed_file",
        "This file is xz-compressed; decompress it and upload the file inside.",
    ),
    (
        b"7z\xbc\xaf\x27\x1c",
        "compressed_file",
        "This is a 7-Zip archive; extract it and upload the file inside.",
    ),
    (
        b"\x28\xb5\x2f\xfd",
        "compressed_file",
        "This file is Zstandard-compressed; decompress it and upload the file inside.",
    ),
)
_SIGNATURES = (
    *((re.compile(re.escape(magic)), code, what) for magic, code, what in _SIGNATURE_LIST),
    (
        re.compile(rb"BZh[1-9]1AY&SY"),
        "compressed_file",
        "This file is bzip2-compressed; decompress it and upload the file inside.",
    ),
)
_REENCODE = (
    "Re-save it as UTF-8 (in Excel: \u201cCSV UTF-8\u201d; in text editors: \u201cSave with encoding \u2192 "
    "UTF-8\u201d) and upload it again."
)
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b") + b"\x7f"


def _check_head(path: Path) -> None:
    """Whole-file checks on the first bytes: empty, binary, compressed, UTF-16/32, not UTF-8."""
    if path.stat().st_size == 0:
        raise FileError("empty_file", "The file is empty (0 bytes).")
    with path.open("rb") as fh:
        head = fh.read(_HEAD_BYTES)
    for magic, code, what in _SIGNATURES:
        if magic.match(head):
            raise FileError(code, what)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        raise FileError("not_utf8", f"The file is UTF-32 encoded. {_REENCODE}")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_like_utf16(head):
        raise FileError(
            "not_utf8", f"The file is UTF-16 encoded (Excel's \u201cUnicode text\u201d). {_REENCODE}"
        )
    sample = head[:8192]
    if len(sample) - len(sample.translate(None, _CONTROL_BYTES)) > len(sample) / 10:
        raise FileError(
            "binary_file", f"This does not look like a text file (it is full of control bytes). {_SUPPORTED}"
        )
    _check_mostly_utf8(head, complete=len(head) < _HEAD_BYTES)


def _looks_like_utf16(head: bytes) -> bool:
    sample = head[:4096]
    half = len(sample) // 2
    if half < 2:
        return False
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    return max(even, odd) > 0.3 * half and min(even, odd) < 0.05 * half


def _check_mostly_utf8(head: bytes, complete: bool) -> None:
    """Raise when most lines of the head are not UTF-8 (a single bad line is a per-line rejection)."""
    lines = head.split(b"\n")
    if not complete:
        lines.pop()  # probably cut in the middle
    nonblank = bad = 0
    first_bad = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        nonblank += 1
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad += 1
            first_bad = first_bad or (number, exc.start + 1, line[exc.start])
    if first_bad and bad * 2 > nonblank:
        number, column, byte = first_bad
        raise FileError(
            "not_utf8",
            f"The file is not UTF-8 encoded (line {number} has byte 0x{byte:02X} at column {column}; it is "
            f"probably Windows-1252 or Latin-1). {_REENCODE}",
            line=number,
        )


@dataclass
class _Sniff:
    container: str  # "jsonl", "array" or "csv"
    fmt: str | None  # detected format, None when unknown
    error: FileError | None = None  # why the format is unknown
    header: _CsvHeader | None = None

    def require_format(self) -> str:
        if self.fmt is None:
            raise self.error or FileError("unknown_format", f"Could not detect the file format. {_SUPPORTED}")
        return self.fmt


def _nonblank(units: Iterable[_Unit]) -> Iterator[_Unit]:
    return (u for u in units if u.problem or u.data.strip())


def _inspect(path: Path, max_line_bytes: int) -> _Sniff:
    _check_head(path)
    with path.open("rb") as fh:
        units = _nonblank(_iter_lines(fh, max_line_bytes))
        first = next(units, None)
        if first is None:
            raise FileError("empty_file", "The file contains only blank lines.")
        lead = first.data.lstrip()[:1]
        if lead == b"{":
            return _Sniff(
                "jsonl",
                *_detect_json(chain([first], islice(units, _DETECT_RECORDS - 1)), False, max_line_bytes),
            )
    if lead == b"[":
        with path.open("rb") as fh:
            elements = islice(_nonblank(_ArrayElements(fh, max_line_bytes)), _DETECT_RECORDS)
            fmt, error = _detect_json(elements, True, max_line_bytes)
        if fmt is None and error is None:
            raise FileError("empty_file", "The JSON array is empty; there are no records to import.")
        return _Sniff("array", fmt, error)
    header = _csv_header(first)
    if header is None:
        error = FileError(
            "unknown_format",
            f"Could not detect the file format: line {first.line} is neither a JSON object (JSON Lines), "
            f"the start of a JSON array, nor a CSV header with at least two columns. {_SUPPORTED}",
            line=first.line,
        )
        return _Sniff("csv", None, error)
    return _Sniff("csv", "csv", header=header)


def _csv_header(first: _Unit) -> _CsvHeader | None:
    if first.problem:
        return None
    try:
        text = first.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = _encoding_reject(first, exc, "column {}").reason
        raise FileError(
            "not_utf8", f"The CSV header (line {first.line}) is not valid UTF-8. {reason}", line=first.line
        )
    delimiter, columns = _parse_header(text)
    if len(columns) < 2:
        return None
    return _CsvHeader(first.line, delimiter, columns)


def _detect_json(
    units: Iterable[_Unit], in_array: bool, max_line_bytes: int
) -> tuple[str | None, FileError | None]:
    """The format of the first recognisable record among ``units`` (else the first record's problem)."""
    error = None
    for unit in units:
        try:
            if unit.problem:
                raise _unit_problem(unit, max_line_bytes, in_array)
            if not in_array and unit.data.strip() == b"{":
                raise _Reject(
                    "pretty_printed",
                    'the line is just "{", so this looks like pretty-printed JSON with each record spread over '
                    "several lines. Write one record per line (JSON Lines), or put the records in a JSON array [...].",
                )
            obj = _load_json_object(unit, in_array, errors="replace")
            guess = _guess_format(obj)
            if guess is not None:
                return guess[0], None
            raise _Reject("unknown", f"it has {_key_list(obj)}.{_unknown_keys_hint(obj)}")
        except _Reject as problem:
            if error is None:
                detail = problem.reason[0].lower() + problem.reason[1:]
                error = FileError(
                    "unknown_format",
                    f"Could not detect the file format from the first record (line {unit.line}): {detail} "
                    f"Supported record shapes: {_FORMAT_EXAMPLES['openai']} (OpenAI chat), "
                    f"{_FORMAT_EXAMPLES['sharegpt']} (ShareGPT), {_FORMAT_EXAMPLES['alpaca']} (Alpaca), "
                    f"{_FORMAT_EXAMPLES['preference']} (preference pairs), or a CSV file with a header row.",
                    line=unit.line,
                )
    return None, error


def _unknown_keys_hint(obj: dict) -> str:
    if {"role", "content"} <= obj.keys():
        return ' It looks like a single message; wrap each conversation as {"messages": [...]}.'
    if {"prompt", "completion"} <= obj.keys():
        return (
            ' Prompt/completion records are not supported; convert each to {"messages": [{"role": "user", ...}, '
            '{"role": "assistant", ...}]}.'
        )
    return ""


def _check_kind(fmt: str, kind: str) -> None:
    if FORMAT_KIND[fmt] == kind:
        return
    if kind == "sft":
        raise FileError(
            "kind_mismatch",
            "This file contains preference pairs (chosen/rejected answers), but this is a supervised "
            "fine-tuning (SFT) dataset. Upload it to a preference dataset instead.",
        )
    raise FileError(
        "kind_mismatch",
        f"This file contains conversations in {FORMAT_LABELS[fmt]} for supervised fine-tuning, but this is a "
        'preference dataset, which needs records with "prompt", "chosen" and "rejected". Upload it to an SFT '
        "dataset instead.",
    )


def detect_format(path: str | Path) -> str:
    """The format of ``path`` (one of :data:`FORMATS`), judged from its first non-blank record.

    Raises :class:`FileError` for empty, binary, compressed or non-UTF-8 files and when the format
    cannot be recognised.
    """
    return _inspect(Path(path), DEFAULT_MAX_LINE_BYTES).require_format()


def csv_columns(path: str | Path) -> list[str]:
    """The column names in the header of a CSV file (for the column-mapping form)."""
    path = Path(path)
    _check_head(path)
    with path.open("rb") as fh:
        first = next(_nonblank(_iter_lines(fh, DEFAULT_MAX_LINE_BYTES)), None)
    if first is None:
        raise FileError("empty_file", "The file contains only blank lines.")
    if first.data.lstrip()[:1] in (b"{", b"["):
        raise FileError("not_csv", "This is a JSON file, not a CSV file; it needs no column mapping.")
    header = _csv_header(first)
    if header is None:
        raise FileError(
            "not_csv",
            f"Line {first.line} is not a CSV header: it needs at least two column names separated by commas.",
        )
    return header.columns


def _resolve_mapping(header: _CsvHeader, mapping: CsvMapping | None) -> CsvMapping:
    available = ", ".join(_quote(c) for c in header.columns)
    if mapping is None:
        mapping = guess_csv_mapping(header.columns)
        if mapping is None:
            raise FileError(
                "csv_mapping_required",
                f"Choose which CSV columns hold the prompt and the response. Available columns: {available}.",
                line=header.line,
            )
    missing = [c for c in mapping.columns() if c.strip() not in header.columns]
    if missing:
        names = ", ".join(_quote(c) for c in missing)
        noun = "columns" if len(missing) > 1 else "column"
        raise FileError(
            "missing_columns",
            f"The CSV header (line {header.line}) has no {noun} named {names}. Available columns: "
            f"{available}. Pick columns that exist, or fix the header row.",
            line=header.line,
        )
    return mapping


# --------------------------------------------------------------------------- parsing


@dataclass
class _Options:
    max_line_bytes: int
    max_tokens: int | None
    count_tokens: Callable[[list[dict]], int] | None
    progress: _Progress


def _finish(example: _Example, line: int, raw: bytes, opts: _Options) -> Record | Rejection:
    """Build the record, applying the token limit."""
    messages = [{"role": t.role, "content": t.content} for t in example.turns]
    if opts.max_tokens is not None and opts.count_tokens is not None:
        if example.chosen is None:
            tokens = opts.count_tokens(messages)
            what = "This example"
        else:
            tokens = max(
                opts.count_tokens([*messages, {"role": "assistant", "content": answer}])
                for answer in (example.chosen, example.rejected or "")
            )
            what = "The prompt plus the longer answer"
        if tokens > opts.max_tokens:
            return Rejection(
                line,
                "too_long",
                f"{what} is {tokens:,} tokens long; the limit is {opts.max_tokens:,} tokens. "
                "Shorten it or split the conversation into smaller examples.",
                raw[:RAW_LIMIT],
            )
    return Record(line, messages, example.tags, example.chosen, example.rejected, example.split)


def _parse_json_units(
    units: Iterator[_Unit], fmt: _JsonFormat, opts: _Options, in_array: bool
) -> Iterator[Record | Rejection]:
    # Common case first: a valid OpenAI chat record without a token limit to apply.
    fast = getattr(fmt, "fast_record", None) if opts.max_tokens is None else None
    for unit in units:
        if (item := _parse_json_unit(unit, fmt, opts, in_array, fast)) is not None:
            yield item
    opts.progress.finish()


def _parse_json_unit(
    unit: _Unit, fmt: _JsonFormat, opts: _Options, in_array: bool, fast
) -> Record | Rejection | None:
    """One line's or array element's record or rejection; None for a blank line."""
    if fast is not None and unit.problem is None and (record := fast(unit.data, unit.line)):
        return record
    try:
        if unit.problem:
            raise _unit_problem(unit, opts.max_line_bytes, in_array)
        if not unit.data.strip():
            return None  # blank line
        obj = _load_json_object(unit, in_array)
        example = fmt.normalise(obj)
        example.split = _read_split(obj.get("split"))
    except _Reject as problem:
        return Rejection(unit.line, problem.code, problem.reason, unit.data[:RAW_LIMIT])
    return _finish(example, unit.line, unit.data, opts)


# --------------------------------------------------------------------------- plain chat blocks
#
# Most uploads are OpenAI chat JSON Lines with nothing wrong in them. For those, the file is read
# _BLOCK_BYTES at a time and each block of whole lines is decoded by one msgspec ``decode_lines`` call
# into the typed structs of ``_typed_record`` (one call into C for some hundred lines instead of a
# call and a ``_Unit`` object per line). A block is taken this way only when it holds nothing but
# lines that start with "{" and end with "}" (CRLF allowed), no NUL byte, and no line longer than
# the limit: then no value can span two lines (after a "}" that closes an inner object, "{" is a
# syntax error), so equally many values as lines means one value per line, in order. Each decoded record then passes the same
# checks as on the line-by-line path (``_typed_chat_record``); a record they refuse goes through
# the line-by-line path alone. Any other block (a blank line, a bad line, a blank or odd content
# that fails the decode...) goes through the line-by-line path as a whole, so every result is the
# one that path gives.

_BLOCK_BYTES = 256 * 1024  # bytes read at a time: about 300 lines of a support chat


def _parse_chat_lines(fh: IO[bytes], fmt: _JsonFormat, opts: _Options) -> Iterator[Record | Rejection]:
    """The records and rejections of an OpenAI chat JSON Lines file, block by block (see above)."""
    progress, limit = opts.progress, opts.max_line_bytes
    fast = fmt.fast_record
    number = offset = 0  # lines and bytes before ``carry``
    carry = b""
    while True:
        data = fh.read(_BLOCK_BYTES)
        if offset == 0 and not carry and data.startswith(_BOM):
            data, offset = data[3:], 3
            progress.advance(3)
        block = carry + data if carry else data
        cut = block.rfind(b"\n") + 1 if data else len(block)
        if not block:
            break
        if cut == 0:  # no line ends in what was read: a line longer than a read
            if len(block) <= limit + 2:
                carry = block
                continue
            # an over-long line: the line-by-line path skips it without holding it, and reads the rest
            fh.seek(offset)
            for unit in _iter_lines(fh, limit, progress, number, offset):
                if (item := _parse_json_unit(unit, fmt, opts, False, fast)) is not None:
                    yield item
            break
        whole, carry = block[:cut], block[cut:]
        yield from _chat_block(whole, number, offset, fmt, opts)
        progress.advance(len(whole))
        number += whole.count(b"\n") + (not whole.endswith(b"\n"))
        offset += len(whole)
        if not data:
            break
    progress.finish()


def _chat_block(block: bytes, number: int, offset: int, fmt: _JsonFormat, opts: _Options) -> list:
    """The records and rejections of a block of whole lines that starts after line ``number``."""
    fast = fmt.fast_record
    lines = block.split(b"\n")
    if not lines[-1]:  # the block ends with a line ending (every block but a file's last line)
        lines.pop()
    limit = opts.max_line_bytes
    chats = None
    if (
        b"\x00" not in block
        and all(line[:1] == b"{" and (line[-1:] == b"}" or line[-2:] == b"}\r") for line in lines)
        and (len(block) <= limit or max(map(len, lines)) <= limit)
    ):
        try:
            chats = _TYPED_CHAT.decode_lines(block)
        except (msgspec.DecodeError, ValueError):  # ValueError: bytes that are not UTF-8
            chats = None
    if chats is None or len(chats) != len(lines):
        units = _iter_lines(io.BytesIO(block), opts.max_line_bytes, None, number, offset)
        return [
            item for unit in units if (item := _parse_json_unit(unit, fmt, opts, False, fast)) is not None
        ]
    items: list = []
    for i, chat in enumerate(chats, number + 1):
        record = _typed_chat_record(chat, i)
        if record is None:  # the general path judges this line
            k = i - number - 1
            start = offset + sum(len(line) + 1 for line in lines[:k])
            ended = k < len(lines) - 1 or block.endswith(b"\n")  # "\r\n" ends a line, a lone "\r" does not
            data = lines[k][:-1] if ended and lines[k].endswith(b"\r") else lines[k]
            record = _parse_json_unit(_Unit(i, data, start, len(data)), fmt, opts, False, fast)
        items.append(record)
    return items


class _RecordTooLarge(Exception):
    pass


class _CsvFeed:
    """Feeds decoded physical lines to ``csv.reader`` and remembers each record's bytes and problems."""

    def __init__(self, units: Iterator[_Unit], max_record_bytes: int) -> None:
        self._units = units
        self._max = max_record_bytes
        self.last_line = 0
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._size = 0
        self._problem: _Reject | None = None

    def __iter__(self) -> _CsvFeed:
        return self

    def __next__(self) -> str:
        unit = next(self._units)
        self.last_line = unit.line
        if self._raw_size < RAW_LIMIT:
            self._raw.append(unit.data[: RAW_LIMIT - self._raw_size])
            self._raw_size += len(self._raw[-1]) + 1
        if unit.problem:  # an over-long physical line: reject its record, feed an empty line instead
            self._note(_unit_problem(unit, self._max, False))
            return "\n"
        self._size += unit.size
        if self._size > self._max:
            raise _RecordTooLarge
        data = unit.data
        if b"\x00" in data:
            self._note(_Reject("nul_bytes", f"Line {unit.line} contains a NUL byte (0x00); remove it."))
            data = data.replace(b"\x00", b"")
        try:
            return data.decode("utf-8") + "\n"
        except UnicodeDecodeError as exc:
            self._note(_encoding_reject(unit, exc, f"line {unit.line}, column {{}}"))
            return data.decode("utf-8", "replace") + "\n"

    def _note(self, problem: _Reject) -> None:
        if self._problem is None:
            self._problem = problem

    def take(self) -> tuple[bytes, _Reject | None]:
        """The current record's raw bytes and first problem; starts the next record."""
        raw, problem = b"\n".join(self._raw)[:RAW_LIMIT], self._problem
        self._raw, self._raw_size, self._size, self._problem = [], 0, 0, None
        return raw, problem


_CSV_ERRORS = {
    "expected after": 'A quoted cell is followed by more text. Inside a quoted cell write a quote as "" (two '
    "double quotes), and put nothing between the closing quote and the next delimiter.",
    "unexpected end of data": "A quoted cell is never closed (the file ends inside quotes); add the closing quote.",
}


def _csv_error_reason(exc: csv.Error) -> str:
    message = str(exc)
    for fragment, reason in _CSV_ERRORS.items():
        if fragment in message:
            return reason
    return f"Malformed CSV row ({message}); check the quoting of this row."


def _parse_csv(
    path: Path, header: _CsvHeader, mapping: CsvMapping, opts: _Options
) -> Iterator[Record | Rejection]:
    if csv.field_size_limit() < opts.max_line_bytes:
        csv.field_size_limit(opts.max_line_bytes)  # process-wide; only ever raised
    rows = _CsvRows(header, mapping)
    with path.open("rb") as fh:
        feed = _CsvFeed(_iter_lines(fh, opts.max_line_bytes, opts.progress), opts.max_line_bytes)
        reader = csv.reader(feed, delimiter=header.delimiter, strict=True)
        while feed.last_line < header.line:  # skip leading blank lines and the header
            next(reader)
        feed.take()
        while True:
            start = feed.last_line + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except _RecordTooLarge:
                raw, _ = feed.take()
                yield Rejection(
                    start,
                    "line_too_long",
                    f"This CSV record is larger than the {_human_bytes(opts.max_line_bytes)} limit. It probably "
                    "contains a quote that is never closed; otherwise shorten the conversation.",
                    raw,
                )
                continue
            except csv.Error as exc:
                raw, _ = feed.take()
                yield Rejection(start, "invalid_csv", _csv_error_reason(exc), raw)
                continue
            raw, problem = feed.take()
            try:
                if problem:
                    raise problem
                if not any(cell.strip() for cell in row):
                    continue  # blank line or a row of empty cells
                example = rows.normalise(row)
            except _Reject as rejected:
                yield Rejection(start, rejected.code, rejected.reason, raw)
                continue
            yield _finish(example, start, raw, opts)
    opts.progress.finish()


def parse_file(
    path: str | Path,
    *,
    fmt: str | None = None,
    kind: str = "sft",
    csv_mapping: CsvMapping | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[list[dict]], int] | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Record | Rejection]:
    """Parse an uploaded dataset file into records and rejections, streaming.

    Whole-file problems raise :class:`FileError` immediately (this function is not itself a
    generator); the returned iterator yields one :class:`Record` or :class:`Rejection` per
    non-blank input record, in file order.

    ``fmt`` forces a format (else it is detected); ``kind`` is the dataset kind ("sft" accepts
    openai/sharegpt/alpaca/csv, "preference" accepts preference). ``csv_mapping`` defaults to a
    guess from common column names. With ``max_tokens`` and ``count_tokens`` longer examples are
    rejected as "too_long". ``progress(bytes_read, total_bytes)`` is called about once per MiB
    and once at the end.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    if max_line_bytes < 1:
        raise ValueError("max_line_bytes must be positive")
    path = Path(path)
    sniff = _inspect(path, max_line_bytes)
    fmt = fmt or sniff.require_format()
    _check_kind(fmt, kind)
    opts = _Options(max_line_bytes, max_tokens, count_tokens, _Progress(progress, path.stat().st_size))
    if fmt == "csv":
        header = sniff.header
        if header is None:
            raise FileError("not_csv", f"This file does not start with a CSV header row. {_SUPPORTED}")
        return _parse_csv(path, header, _resolve_mapping(header, csv_mapping), opts)
    json_format = _JSON_FORMATS[fmt]
    if sniff.container == "array":
        return _parse_array(path, json_format, opts)
    return _parse_jsonl(path, json_format, opts)


def _parse_jsonl(path: Path, fmt: _JsonFormat, opts: _Options) -> Iterator[Record | Rejection]:
    with path.open("rb") as fh:
        if getattr(fmt, "fast_record", None) is not None and opts.max_tokens is None:
            yield from _parse_chat_lines(fh, fmt, opts)
            return
        yield from _parse_json_units(_iter_lines(fh, opts.max_line_bytes, opts.progress), fmt, opts, False)


def _parse_array(path: Path, fmt: _JsonFormat, opts: _Options) -> Iterator[Record | Rejection]:
    with path.open("rb") as fh:
        yield from _parse_json_units(
            iter(_ArrayElements(fh, opts.max_line_bytes, opts.progress)), fmt, opts, True
        )
