"""Import 10,000 and 100,000 examples (no PII scan) through the studio's import service and compare
with a bare `json.loads` loop over the same file, in the same run.

Run by hand:  .venv/bin/python bench/import_scale.py [--sizes 10000 100000] [--repeat 3] [--tokenizer]

Each size is imported --repeat times, each time right after its own json.loads baseline, and the
median ratio is the figure: this machine's speed drifts by tens of percent from one second to the
next, so one pair of runs can land anywhere. Each import runs in a fresh child process (fresh SQLite
database under a temp dir) so its peak RSS is its own. From 4 MB on, the import forks two helper processes (one prepares rows, one encrypts the
original upload); their peak RSS and CPU time are printed too, and the memory target is checked
against the import process plus its largest helper. Targets: peak RSS under 500 MB, growing under 20%
from 10k to 100k; import time within 3× of the bare json.loads loop. Prints figures; asserts nothing.

Each run also times the database's share alone ("floor"): the same rows, parsed and prepared
beforehand, inserted and committed by the studio's own insert code into a fresh database, nothing
else. No import of the file can take less than that plus reading the file once.

Both start from an empty SQLite write-ahead log (the migrations' pages copied into the database file
first) and end with a checkpoint of their own pages, inside the timed part: each is charged for
exactly the pages it wrote, neither for the migrations' nor for none.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "order",
    "shipping",
    "refund",
    "account",
    "password",
    "invoice",
    "delivery",
    "router",
    "firmware",
    "billing",
    "plan",
    "upgrade",
    "cancel",
    "address",
    "parcel",
    "warranty",
    "screen",
    "battery",
    "charger",
    "login",
    "support",
    "ticket",
    "update",
]


def make_file(path: Path, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 120)))
            row = {
                "messages": [{"role": "user", "content": f"#{i} {q}?"}, {"role": "assistant", "content": a}],
                "tags": [rng.choice(["billing", "shipping", "account"])],
            }
            fh.write(json.dumps(row) + "\n")


def child(path: str, with_tokenizer: bool) -> None:
    """Runs in a fresh process: migrate a private SQLite DB, import, print a JSON line of figures."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    sys.path.insert(0, str(ROOT))
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from datasets_app.services import datasets, imports
    from training_app.models import BaseModel

    base = BaseModel.objects.first() if with_tokenizer else None
    ds = datasets.create_dataset(f"bench-{time.time()}", "sft", "bench", base_model=base)
    _checkpoint()  # the import is not charged for migrate's pages in the write-ahead log...
    t0, cpu0 = time.perf_counter(), time.process_time()
    upload = imports.receive_path(ds, None, Path(path))
    result = imports.process(upload.pk)
    checkpoint = _checkpoint()  # ...but for its own, wherever SQLite would have copied them later
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    own, helpers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = {
        "imported": result.imported,
        "seconds": seconds,
        "checkpoint_s": checkpoint,
        "cpu_s": cpu,
        "helper_cpu_s": helpers.ru_utime + helpers.ru_stime,
        "peak_rss_mb": own.ru_maxrss / 1024,
        "helper_peak_rss_mb": helpers.ru_maxrss / 1024,
    }
    print(json.dumps(figures))


def _checkpoint() -> float:
    """Copy what SQLite's write-ahead log holds into the database file, as its auto-checkpoint does
    once the log passes 1,000 pages (an import of 100,000 rows passes it and has copied most of its
    pages at its commit; one of 10,000 does not, and leaves them to a later write). Seconds taken."""
    from django.db import connection

    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - t0


def floor_child(path: str) -> None:
    """Runs in a fresh process: the database work of an import alone, on rows prepared untimed."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    sys.path.insert(0, str(ROOT))
    django.setup()
    from django.core.management import call_command
    from django.db import transaction
    from django.utils import timezone

    call_command("migrate", verbosity=0)
    from datasets_app import parsing
    from datasets_app.services import datasets, imports

    ds = datasets.create_dataset(f"floor-{time.time()}", "sft", "bench")
    upload = imports.receive_path(ds, None, Path(path))
    batches = list(imports.prepare_batches(parsing.parse_file(path, kind="sft"), 1000))
    _checkpoint()
    t0 = time.perf_counter()
    with imports._parents_held(), transaction.atomic():
        position, now = 0, timezone.now()
        for good, _rejected in batches:
            imports._insert_examples(ds, upload, good, position, None, now=now)
            position += len(good)
    _checkpoint()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rows": position, "raw_seconds": _raw_sqlite(ds, upload, batches)}))


def _raw_sqlite(ds, upload, batches) -> float:
    """The SQLite engine's own share: the same prepared rows inserted with the plain `sqlite3` module (no
    Django) into a fresh file with the studio's Example table and indexes (their DDL copied from the
    migrated database) and its settings (16 KiB pages, WAL, synchronous NORMAL; CHECK and foreign key
    constraints off, as the import runs), one transaction, as many rows per INSERT statement as the
    import's, commit and checkpoint. No import that writes these rows as rows can take less. Seconds taken."""
    import sqlite3

    from django.db import connection

    from datasets_app.models import Example
    from datasets_app.services import imports
    from studio.db import ROWS_PER_STATEMENT, insert_sql

    table = Example._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("SELECT sql FROM sqlite_master WHERE tbl_name = %s AND sql IS NOT NULL", [table])
        ddl = [row[0] for row in cursor.fetchall()]
    names, fixed = imports._fixed_columns(ds, upload, connection)
    quote = connection.schema_editor().quote_value
    columns = [Example._meta.get_field(n).column for n in imports._ROW_COLUMNS] + names
    shared = ", ".join(quote(v) for v in fixed)
    size = ROWS_PER_STATEMENT  # as many rows per statement as the studio's insert
    values = f"?+0, ?, ?, ?, ?, ?, ?, ?, 0, {shared}"

    def sql(rows: int) -> str:  # the studio's own statement text
        return insert_sql(connection, table, columns, values, rows)

    statements = [  # (rows, values), prepared untimed
        (len(good[i : i + size]), [value for prepared in good[i : i + size] for value in prepared])
        for good, _rejected in batches
        for i in range(0, len(good), size)
    ]
    texts = {n: sql(n) for n, _values in statements}
    path = Path(connection.settings_dict["NAME"]).with_suffix(".raw.sqlite3")
    raw = sqlite3.connect(path, isolation_level=None)
    raw.executescript("PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
    for statement in ddl:  # the table first (sqlite_master lists it before its indexes)
        raw.execute(statement.replace('REFERENCES "', 'REFERENCES "_unused_'))
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute("PRAGMA ignore_check_constraints = ON")
    t0 = time.perf_counter()
    raw.execute("BEGIN IMMEDIATE")
    for rows, values in statements:
        raw.execute(texts[rows], values)
    raw.execute("COMMIT")
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = time.perf_counter() - t0
    raw.close()
    return seconds


def bare_json(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            json.loads(line)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--tokenizer", action="store_true", help="count tokens with the registered base model")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size; the median ratio is the figure")
    ap.add_argument("--child", default="")
    ap.add_argument("--floor-child", default="")
    args = ap.parse_args()
    if args.floor_child:
        floor_child(args.floor_child)
        return
    if args.child:
        child(args.child, args.tokenizer)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"import-{n}.jsonl"
            make_file(path, n)
            runs = []
            for attempt in range(args.repeat):
                # the baseline right before the import, so that both see the machine in the same state
                baseline = bare_json(path)
                env = dict(os.environ)
                if not args.tokenizer:
                    env.update(
                        STUDIO_VAR_DIR=str(Path(tmp) / f"var-{n}-{attempt}"),
                        DATABASE_URL=f"sqlite:///{tmp}/bench-{n}-{attempt}.sqlite3",
                    )
                cmd = [sys.executable, __file__, "--child", str(path)] + (
                    ["--tokenizer"] if args.tokenizer else []
                )
                out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
                figures = json.loads(out.stdout.strip().splitlines()[-1])
                figures.update(json_loads_s=baseline, ratio=figures["seconds"] / baseline)
                figures["total_rss_mb"] = figures["peak_rss_mb"] + figures["helper_peak_rss_mb"]
                if not args.tokenizer:
                    env["DATABASE_URL"] += "-floor"
                    cmd = [sys.executable, __file__, "--floor-child", str(path)]
                    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
                    floor = json.loads(out.stdout.strip().splitlines()[-1])
                    figures["floor_ratio"] = floor["seconds"] / baseline
                    figures["raw_ratio"] = floor["raw_seconds"] / baseline
                runs.append(figures)
                print(
                    f"{n:>7} examples ({path.stat().st_size / 1e6:.1f} MB), run {attempt + 1}: import "
                    f"{figures['seconds']:.2f} s ({n / figures['seconds']:,.0f} examples/s), bare json.loads "
                    f"{baseline:.2f} s, ratio {figures['ratio']:.2f}x (its final checkpoint {1000 * figures['checkpoint_s']:.0f} ms); CPU {figures['cpu_s']:.2f} s + helpers "
                    f"{figures['helper_cpu_s']:.2f} s; peak RSS {figures['peak_rss_mb']:.0f} MB + largest helper "
                    f"{figures['helper_peak_rss_mb']:.0f} MB = {figures['total_rss_mb']:.0f} MB"
                    + (
                        f"; database alone {figures['floor_ratio']:.2f}x, plain sqlite3 {figures['raw_ratio']:.2f}x"
                        if "floor_ratio" in figures
                        else ""
                    )
                )
            middle = sorted(runs, key=lambda f: f["ratio"])[len(runs) // 2]
            results[n] = {key: max(f[key] for f in runs) for key in ("total_rss_mb", "peak_rss_mb")}
            floors = sorted(f["floor_ratio"] for f in runs if "floor_ratio" in f)
            raws = sorted(f["raw_ratio"] for f in runs if "raw_ratio" in f)
            floor = (
                f", database alone median {floors[len(floors) // 2]:.2f}x, plain sqlite3 median "
                f"{raws[len(raws) // 2]:.2f}x"
                if floors
                else ""
            )
            print(
                f"{n:>7} examples: median ratio {middle['ratio']:.2f}x of {len(runs)} (target <= 3x){floor}; "
                f"highest peak RSS {results[n]['total_rss_mb']:.0f} MB with helpers (target < 500 MB)"
            )
    if len(results) >= 2:
        small, large = min(results), max(results)
        growth = results[large]["total_rss_mb"] / results[small]["total_rss_mb"] - 1
        own = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"] - 1
        print(
            f"peak RSS growth {small:,} -> {large:,}: {100 * growth:+.1f}% with helpers, "
            f"{100 * own:+.1f}% import process alone (target < 20%)"
        )


if __name__ == "__main__":
    main()
