"""Text search over examples, straight from the stored messages (no copy of the text in a second column).

An example matches when ``q.lower()`` occurs in its segments (message contents, then chosen and
rejected) joined with newlines and lower-cased, the same text the old ``search_text`` column held.

* SQLite: a deterministic SQL function ``studio_text_contains(messages, chosen, rejected, needle)``,
  registered on every new connection (see ``DatasetsConfig.ready``), does exactly that in Python, so
  case folding is Python's (SQLite's own ``lower()`` only folds ASCII). Most rows are ruled out
  without parsing their JSON.
* PostgreSQL: the same text is built in SQL from the ``jsonb`` array and searched with ``strpos``.
"""

from __future__ import annotations

import orjson
from django.db.models import BooleanField, F, Func, QuerySet, Value

SQLITE_FUNCTION = "studio_text_contains"


def _texts(messages: list, chosen: str | None, rejected: str | None) -> list[str]:
    texts = [m.get("content") if type(m) is dict else None for m in messages]
    texts = [t if type(t) is str else "" if t is None else str(t) for t in texts]
    return texts + [t for t in (chosen, rejected) if t is not None]


def _sqlite_text_contains(
    messages: str | None, chosen: str | None, rejected: str | None, needle: str
) -> bool:
    if "\n" in needle:  # may span segments: search the joined text
        turns = _load(messages)
        return needle in "\n".join(_texts(turns, chosen, rejected)).lower()
    # Otherwise a match lies inside one segment.
    if any(t is not None and needle in t.lower() for t in (chosen, rejected)):
        return True
    if not messages:
        return False
    if messages.isascii() and "\\" not in messages and needle not in messages.lower():
        return False  # ASCII JSON without escapes holds every content verbatim: no need to parse it
    return any(needle in t.lower() for t in _texts(_load(messages), None, None))


def _load(messages: str | None) -> list:
    try:
        turns = orjson.loads(messages) if messages else []
    except orjson.JSONDecodeError:
        return []
    return turns if type(turns) is list else []


def register_sqlite_function(sender, connection, **kwargs) -> None:
    """``connection_created`` receiver."""
    if connection.vendor == "sqlite":
        connection.connection.create_function(SQLITE_FUNCTION, 4, _sqlite_text_contains, deterministic=True)


class TextContains(Func):
    """True when an example's text contains the (already lower-cased) needle."""

    output_field = BooleanField()
    arity = 4

    def as_sqlite(self, compiler, connection, **extra):
        return super().as_sql(compiler, connection, function=SQLITE_FUNCTION, **extra)

    def as_postgresql(self, compiler, connection, **extra):
        messages, chosen, rejected, needle = (compiler.compile(e) for e in self.get_source_expressions())
        # compiled column expressions; the needle is a bound parameter
        aggregate = "SELECT string_agg(turn.value ->> 'content', E'\\n' ORDER BY turn.n)"
        turns = f"jsonb_array_elements({messages[0]}) WITH ORDINALITY AS turn(value, n)"
        text = f"concat_ws(E'\\n', ({aggregate} FROM {turns}), {chosen[0]}, {rejected[0]})"  # noqa: S608
        sql = f"strpos(lower({text}), {needle[0]}) > 0"
        return sql, (*messages[1], *chosen[1], *rejected[1], *needle[1])

    def as_sql(self, compiler, connection, **extra):  # other databases: not supported by the studio
        raise NotImplementedError(f"text search is not implemented for {connection.vendor}")


def search(queryset: QuerySet, q: str) -> QuerySet:
    """Examples of ``queryset`` whose text contains ``q`` (case-insensitive)."""
    needle = q.lower()
    if not needle:
        return queryset
    return queryset.filter(TextContains(F("messages"), F("chosen"), F("rejected"), Value(needle)))
