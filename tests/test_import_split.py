"""An optional top-level "split" field (train / eval / golden, as the studio's export writes it) is
read by every JSON format and every import path, so a re-imported export keeps its held-out sets."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from datasets_app import parsing
from datasets_app.models import Dataset, Example, Upload
from datasets_app.services import datasets, imports

pytestmark = pytest.mark.django_db

CHAT = [{"role": "user", "content": "Where is order ORD-1?"}, {"role": "assistant", "content": "On its way."}]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def parsed(path: Path, **kwargs) -> list:
    return list(parsing.parse_file(str(path), **kwargs))


def test_split_is_read_on_the_typed_the_orjson_and_the_general_path(tmp_path):
    rows = [
        {"messages": CHAT, "split": "eval"},  # typed path (msgspec)
        {"messages": CHAT, "split": "golden", "id": 7},  # another key: the orjson path
        {"messages": CHAT, "split": "Eval"},  # not exact: the general path, which normalises case
        {"messages": CHAT, "tags": ["x"], "split": None},  # null: the default
        {"messages": CHAT},
        {
            "messages": [{"role": "USER", "content": "hi"}, {"role": "assistant", "content": "ok"}],
            "split": "golden",
        },
    ]
    records = parsed(write(tmp_path / "a.jsonl", rows))
    assert all(type(r) is not parsing.Rejection for r in records)
    assert [r.split for r in records] == ["eval", "golden", "eval", None, None, "golden"]
    assert type(records[0]) is parsing.JsonRecord


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sft"),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "sft"),
        ({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}, "preference"),
    ],
    ids=["sharegpt", "alpaca", "preference"],
)
def test_every_json_format_reads_the_split(tmp_path, row, kind):
    records = parsed(write(tmp_path / "f.jsonl", [{**row, "split": "golden"}, row]), kind=kind)
    assert [r.split for r in records] == ["golden", None]


def test_an_unknown_split_names_the_line_the_value_and_the_choices(tmp_path):
    rows = [
        {"messages": CHAT, "split": "validation"},
        {"messages": CHAT, "split": ["eval"]},
        {"messages": CHAT},
    ]
    items = parsed(write(tmp_path / "bad.jsonl", rows))
    rejections = [i for i in items if type(i) is parsing.Rejection]
    assert [(r.line, r.code) for r in rejections] == [(1, "unknown_split"), (2, "unknown_split")]
    assert '"split" is "validation"; it must be "train", "eval" or "golden"' in rejections[0].reason
    assert '"split" is a list' in rejections[1].reason
    assert "remove the field" in rejections[0].reason


@pytest.mark.parametrize("forked", [False, True], ids=["in-process", "forked-helper"])
def test_import_stores_each_examples_split_and_rejects_unknown_ones(curator, tmp_path, monkeypatch, forked):
    if forked:
        monkeypatch.setattr(imports, "HELPER_MIN_BYTES", 0)
    ds = datasets.create_dataset("Splits", "sft", curator)
    rows = [{"messages": CHAT, "split": s} for s in ("eval", "golden", "train", "test")] + [
        {"messages": CHAT}
    ]
    upload = imports.receive_path(ds, curator, write(tmp_path / "s.jsonl", rows))
    result = imports.process(upload.pk)
    assert (result.imported, result.rejected) == (4, 1)
    assert [r["line"] for r in result.rejections] == [4]
    stored = list(Example.objects.filter(dataset=ds).order_by("position").values_list("source_line", "split"))
    assert stored == [(1, "eval"), (2, "golden"), (3, "train"), (5, "train")]
    assert Upload.objects.get(pk=upload.pk).report["counts"] == {"unknown_split": 1}


def test_token_counting_path_keeps_the_split(curator, tmp_path, monkeypatch):
    """With a base model the rows go through the general insert (token counts): same splits."""

    def count(records):
        return [7 for _ in records]

    monkeypatch.setattr(imports, "_token_counter", lambda dataset: (count, 100))
    ds = datasets.create_dataset("Splits counted", "sft", curator)
    rows = [{"messages": CHAT, "split": "golden"}, {"messages": CHAT}]
    result = imports.process(imports.receive_path(ds, curator, write(tmp_path / "t.jsonl", rows)).pk)
    assert result.imported == 2
    assert list(
        Example.objects.filter(dataset=ds).order_by("position").values_list("split", "token_count")
    ) == [
        ("golden", 7),
        ("train", 7),
    ]


def test_import_command_prints_the_unknown_split_line(tmp_path, roles):
    path = write(
        tmp_path / "cli.jsonl", [{"messages": CHAT, "split": "eval"}, {"messages": CHAT, "split": "dev"}]
    )
    out = StringIO()
    call_command("import_dataset", str(path), "--name", "cli splits", stdout=out, stderr=out)
    text = out.getvalue()
    assert 'line 2: "split" is "dev"' in text
    ds = Dataset.objects.get(name="cli splits")
    assert text.strip().splitlines()[-1] == str(ds.pk)
    assert list(ds.examples.values_list("split", flat=True)) == ["eval"]
