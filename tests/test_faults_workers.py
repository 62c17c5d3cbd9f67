"""Faults: a real `celery worker` process killed with SIGKILL (the worker and its pool child) in the middle
of a PII scan. The beat watchdog requeues the scan, a fresh worker finishes it: every example ends
scanned, no finding is written twice, and the findings are exactly those a clean scan produces.

PostgreSQL + Redis in CI (DATABASE_URL / CELERY_BROKER_URL), SQLite + the filesystem broker locally."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import timedelta

import pytest
from conftest import kill_worker, wait_for
from test_eval_runs import candidate_dir  # noqa: F401 - session fixture: a tiny "fine-tuned" model

from datasets_app.models import Example, PiiFinding
from datasets_app.services import datasets, imports, scrub
from datasets_app.tasks import analyse_dataset

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

N_EXAMPLES = 400


def finding_keys(dataset) -> list[tuple]:
    return list(
        PiiFinding.objects.filter(dataset=dataset).values_list(
            "example_id", "segment", "start", "end", "entity_type"
        )
    )


def pii_dataset(user, tmp_path, name: str, n: int = N_EXAMPLES):
    """A dataset of `n` imported (not yet scanned) conversations, each with a name and an e-mail address:
    a scan long enough to kill a worker in the middle of it."""
    dataset = datasets.create_dataset(name, "sft", user)
    path = tmp_path / "pii.jsonl"
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": f"Hi, I am Maria Gonzalez. Order {i} is late; mail me at m{i}@example.com.",
                },
                {"role": "assistant", "content": f"Sorry Maria, order {i} ships today ({i * 37 % 1000} km)."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert imports.process(imports.receive_path(dataset, user, path).pk).imported == n
    return dataset


def test_sigkilled_pii_scan_is_requeued_and_finishes_once(start_worker, curator, tmp_path, monkeypatch):
    dataset = pii_dataset(curator, tmp_path, "Killed scan")

    def scanned() -> int:
        return Example.objects.filter(dataset=dataset).exclude(pii_status="unscanned").count()

    first = start_worker("curation", STUDIO_PII_BATCH="1")
    analyse_dataset.delay(dataset.pk)
    wait_for(lambda: scanned() >= 5, first, timeout=60, what="the scan to be under way")
    kill_worker(first)
    done_before = scanned()
    assert 0 < done_before < N_EXAMPLES, "the scan finished before the kill; make it longer"
    keys = finding_keys(dataset)
    assert len(keys) == len(set(keys))

    # The broker will not hand the lost message back for hours (Redis visibility timeout; the
    # filesystem broker has already deleted it): the watchdog notices the stopped scan and requeues it.
    monkeypatch.setattr(scrub, "SCAN_STALE_AFTER", timedelta(0))
    from studio.tasks import watchdog

    assert watchdog()["scans"] == [dataset.pk]
    monkeypatch.setattr(scrub, "SCAN_STALE_AFTER", timedelta(hours=1))
    assert watchdog()["scans"] == []  # requeued once, not on every beat

    second = start_worker("curation", STUDIO_PII_BATCH="16")
    wait_for(lambda: scanned() == N_EXAMPLES, second, timeout=60, what="the requeued scan")
    keys = finding_keys(dataset)
    duplicated = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicated
    assert Example.objects.filter(dataset=dataset, pii_status="unscanned").count() == 0
    assert {t for *_, t in keys} >= {"EMAIL_ADDRESS", "PERSON"}
    every_example = set(Example.objects.filter(dataset=dataset).values_list("pk", flat=True))
    assert {k[0] for k in keys if k[4] == "EMAIL_ADDRESS"} == every_example
    # exactly what one uninterrupted scan finds: nothing lost, nothing extra
    scrub.scan_examples(dataset)
    assert sorted(finding_keys(dataset)) == sorted(keys)
    assert watchdog()["scans"] == []


def test_watchdog_leaves_fresh_and_live_scans_alone(curator, monkeypatch):
    from django.utils import timezone

    from datasets_app.services import progress
    from studio.tasks import watchdog

    sent = []
    monkeypatch.setattr("datasets_app.tasks.analyse_dataset.delay", lambda pk, *a: sent.append(pk))
    dataset = datasets.create_dataset("Fresh", "sft", curator)
    ex = Example.objects.create(
        dataset=dataset,
        position=0,
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        content_hash="0" * 64,
    )
    assert watchdog()["scans"] == []  # just written (imported or edited): its scan is on the way
    Example.objects.filter(pk=ex.pk).update(updated_at=timezone.now() - timedelta(minutes=10))
    progress.set_progress("scan", dataset.pk, "Scanning for personal data", 0, 1)
    assert watchdog()["scans"] == []  # a scan reported progress within SCAN_STALE_AFTER
    progress.clear_progress("scan", dataset.pk)
    assert watchdog()["scans"] == [dataset.pk] and sent == [dataset.pk]
    assert watchdog()["scans"] == [] and sent == [dataset.pk]  # marked: not queued again on the next beat


# --- evaluation run -------------------------------------------------------------------------------------


def test_sigkilled_evaluation_run_is_requeued_and_finishes_without_duplicates(
    start_worker,
    tiny_model_dir,
    candidate_dir,  # noqa: F811 - the fixture imported above
    curator,
    engineer,
    admin_user,
    settings,  # noqa: F811
):
    from pathlib import Path

    from conftest import make_version
    from test_eval_runs import GOLDEN, golden_version, make_candidate

    from eval_app.models import EvalRun, Generation
    from eval_app.services import evaluation
    from studio.tasks import watchdog
    from training_app.services import register_local_dir

    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_candidate(
        "support", base, candidate_dir, engineer, dataset_version=make_version(curator, train=2, eval_=0)
    )
    rows = [(f"{q} ({i})", a, t) for i in range(2) for q, a, t in GOLDEN[:9]]
    golden = golden_version(curator, rows=rows)
    first = start_worker("gpu", STUDIO_JOB_HEARTBEAT_SECONDS="0.5")
    run = evaluation.create_run(engineer, version, "base", golden, max_new_tokens=12, batch_size=1)

    def generations() -> int:
        return Generation.objects.filter(run=run, kind="prompt").count()

    wait_for(lambda: generations() >= 2, first, timeout=60, what="the first generations")
    kill_worker(first)
    killed = EvalRun.objects.get(pk=run.pk)
    assert killed.state == "running" and 0 < generations() < 2 * len(rows)

    settings.STUDIO_JOB_STALE_SECONDS = 2
    time.sleep(2.5)
    assert watchdog()["evals"]["requeued"] == [run.pk]
    assert EvalRun.objects.get(pk=run.pk).state == "queued"

    second = start_worker("gpu", STUDIO_JOB_HEARTBEAT_SECONDS="0.5")
    wait_for(
        lambda: EvalRun.objects.get(pk=run.pk).state not in ("queued", "running"),
        second,
        timeout=60,
        what="the requeued run",
    )
    done = EvalRun.objects.get(pk=run.pk)
    assert done.state == "succeeded", (done.error_message, done.error_traceback[-3000:])
    assert done.attempt == 2
    keys = list(Generation.objects.filter(run=done).values_list("side", "kind", "position"))
    assert len(keys) == len(set(keys))
    assert generations() == 2 * len(rows)
    assert done.comparisons.count() == len(rows)
    assert watchdog()["evals"]["requeued"] == []
