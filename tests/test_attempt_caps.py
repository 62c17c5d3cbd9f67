"""Never stuck (issue 5 §2): a PII scan whose worker is killed every time is given up after
STUDIO_JOB_MAX_ATTEMPTS attempts with a reason on the dataset page, and a failed or cancelled training job
with an intact checkpoint is resumed from it ("Resume from checkpoint": engineer or admin, POST, audited).

Real `celery worker` processes killed with SIGKILL, the real watchdog, a real (tiny) trainer.
PostgreSQL + Redis in CI (DATABASE_URL / CELERY_BROKER_URL), SQLite + the filesystem broker locally."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import assert_curve_continues, job_verbs, kill_worker, make_version, smoke_request, wait_for
from django.urls import reverse
from django.utils import timezone
from test_faults_services import small_disk  # noqa: F401 - fixture: a real 32 MiB tmpfs (root only)
from test_faults_workers import pii_dataset

from datasets_app.models import Example, PiiFinding
from datasets_app.services import datasets, progress, scrub, versions
from studio.models import AuditEvent
from training_app.models import TrainingJob
from training_app.services import jobs, register_local_dir

N_EXAMPLES = 400
WORKER_ENV = {"STUDIO_JOB_HEARTBEAT_SECONDS": "0.5"}


def _events(verb: str, obj) -> list[dict]:
    return list(
        AuditEvent.objects.filter(verb=verb, object_type=obj._meta.model_name, object_id=str(obj.pk))
        .order_by("id")
        .values_list("data", flat=True)
    )


# =====================================================================================================
# PII scans: attempt cap
# =====================================================================================================


def _unscanned_dataset(curator, name="Scan"):
    dataset = datasets.create_dataset(name, "sft", curator)
    for i in range(3):
        Example.objects.create(
            dataset=dataset,
            position=i,
            messages=[{"role": "user", "content": f"Hi, I am Maria, mail m{i}@example.com"}],
            content_hash=f"{i:064d}",
        )
    Example.objects.filter(dataset=dataset).update(updated_at=timezone.now() - timedelta(minutes=10))
    return dataset


@pytest.mark.django_db
def test_scan_below_cap_is_requeued_then_failed_once_with_reason_and_never_again(
    curator, client_for, settings, monkeypatch
):
    from studio.tasks import watchdog

    settings.STUDIO_JOB_MAX_ATTEMPTS = 3
    sent = []
    monkeypatch.setattr("datasets_app.tasks.analyse_dataset.delay", lambda pk, *a: sent.append(pk))
    dataset = _unscanned_dataset(curator)
    assert scrub.scan_attempts(dataset.pk) == (1, None)

    def beat():
        # each requeued attempt reports progress, then dies: its progress is older than SCAN_STALE_AFTER
        # by the next beat that looks at it
        progress.clear_progress("scan", dataset.pk)
        return watchdog()["scans"]

    # attempts 1 and 2 died: requeued each time (attempt 2, then 3), with an audit event
    assert beat() == [dataset.pk]
    assert watchdog()["scans"] == []  # its progress is fresh: not requeued twice
    assert scrub.scan_attempts(dataset.pk) == (2, None)
    assert beat() == [dataset.pk]
    assert sent == [dataset.pk, dataset.pk]
    assert [e["attempt"] for e in _events("pii.scan.requeue", dataset)] == [2, 3]
    assert "wait for the scan" in " ".join(versions.blockers(dataset))

    # attempt 3 died too: the cap is reached, the scan fails with a reason, nothing is sent
    assert beat() == []
    assert sent == [dataset.pk, dataset.pk]
    (failure,) = _events("pii.scan.fail", dataset)
    assert failure == {"reason": "worker_lost", "attempts": 3, "unscanned": 3}
    reason = scrub.scan_failure(dataset)
    assert reason and "given up after its worker stopped 3 times" in reason and "Re-scan dataset" in reason
    page = client_for(curator).get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert "3 examples have not been scanned for personal data: The personal-data scan was given up" in page
    assert "wait for the scan" not in page
    with pytest.raises(versions.FreezeRefused, match="given up after its worker stopped 3 times"):
        versions.freeze(dataset, curator)

    # never requeued again on later beats
    for _ in range(3):
        assert beat() == []
    assert sent == [dataset.pk, dataset.pk] and len(_events("pii.scan.fail", dataset)) == 1

    # new work (an example written after the failure) is a new scan with a fresh budget
    Example.objects.create(
        dataset=dataset,
        position=9,
        messages=[{"role": "user", "content": "Call me on 555-0100"}],
        content_hash="9" * 64,
    )
    assert scrub.scan_failure(dataset) is None  # the page says to wait for its scan again
    assert beat() == []  # just written: its own scan is on the way, the given-up one stays given up
    monkeypatch.setattr(scrub, "SCAN_STALE_AFTER", timedelta(0))  # ... and it did not finish either
    assert beat() == [dataset.pk]
    assert scrub.scan_attempts(dataset.pk) == (2, None)

    # a curator's re-scan starts afresh too
    response = client_for(curator).post(reverse("datasets:pii_rescan", args=[dataset.pk]))
    assert response.status_code == 302
    assert scrub.scan_attempts(dataset.pk) == (1, None)


@pytest.mark.django_db
def test_scan_cap_of_one_fails_at_the_first_stop(curator, settings, monkeypatch):
    from studio.tasks import watchdog

    settings.STUDIO_JOB_MAX_ATTEMPTS = 1
    sent = []
    monkeypatch.setattr("datasets_app.tasks.analyse_dataset.delay", lambda pk, *a: sent.append(pk))
    dataset = _unscanned_dataset(curator, "Cap one")
    assert watchdog()["scans"] == [] and sent == []
    assert "stopped 1 times" in scrub.scan_failure(dataset)
    assert len(_events("pii.scan.fail", dataset)) == 1 and not _events("pii.scan.requeue", dataset)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_scan_whose_worker_is_killed_every_time_fails_with_reason_then_rescan_finishes(
    start_worker, curator, client_for, tmp_path, monkeypatch, settings
):
    from studio.tasks import watchdog

    settings.STUDIO_JOB_MAX_ATTEMPTS = 2
    dataset = pii_dataset(curator, tmp_path, "Poisonous upload", N_EXAMPLES)

    def scanned() -> int:
        return Example.objects.filter(dataset=dataset).exclude(pii_status="unscanned").count()

    from datasets_app.tasks import analyse_dataset

    monkeypatch.setattr(scrub, "SCAN_STALE_AFTER", timedelta(0))
    # attempt 1: killed mid-scan; the watchdog requeues it (one real message on the broker)
    first = start_worker("curation", STUDIO_PII_BATCH="1")
    analyse_dataset.delay(dataset.pk)
    wait_for(lambda: scanned() >= 5, first, timeout=120, what="the first attempt to be under way")
    kill_worker(first)
    done_first = scanned()
    assert done_first < N_EXAMPLES, "the scan finished before the kill; make it longer"
    assert watchdog()["scans"] == [dataset.pk]

    # attempt 2 (the requeued message, on a fresh worker): killed mid-scan as well
    second = start_worker("curation", STUDIO_PII_BATCH="1")
    wait_for(lambda: scanned() >= done_first + 5, second, timeout=120, what="the requeued attempt")
    kill_worker(second)
    assert scanned() < N_EXAMPLES, "the requeued scan finished before the kill; make it longer"

    # the cap (2) is reached: failed with a reason, never requeued again
    assert watchdog()["scans"] == []
    assert watchdog()["scans"] == []
    assert len(_events("pii.scan.requeue", dataset)) == 1
    (failure,) = _events("pii.scan.fail", dataset)
    assert failure["attempts"] == 2 and failure["unscanned"] == N_EXAMPLES - scanned()
    curator_client = client_for(curator)
    page = curator_client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert "The personal-data scan was given up after its worker stopped 2 times" in page

    # the curator re-scans (e.g. after giving the workers more memory): a healthy worker finishes once
    third = start_worker("curation", STUDIO_PII_BATCH="16")
    assert curator_client.post(reverse("datasets:pii_rescan", args=[dataset.pk])).status_code == 302
    wait_for(lambda: scanned() == N_EXAMPLES, third, timeout=180, what="the curator's re-scan")
    keys = list(
        PiiFinding.objects.filter(dataset=dataset).values_list(
            "example_id", "segment", "start", "end", "entity_type"
        )
    )
    assert not [k for k, n in Counter(keys).items() if n > 1]  # nothing duplicated
    every_example = set(Example.objects.filter(dataset=dataset).values_list("pk", flat=True))
    assert {k[0] for k in keys if k[4] == "EMAIL_ADDRESS"} == every_example
    assert scrub.scan_failure(dataset) is None
    assert not any("scanned" in b for b in versions.blockers(dataset))
    assert watchdog()["scans"] == []


# =====================================================================================================
# Training jobs: "Resume from checkpoint"
# =====================================================================================================


@pytest.fixture
def tiny_base(tiny_model_dir, admin_user):
    return register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)


@pytest.fixture
def quiet_heartbeat(settings):
    """In-transaction tests: a heartbeat thread (own connection) could not see the uncommitted job."""
    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 3600


def _cancelled_with_checkpoint(engineer, version, base) -> TrainingJob:
    job = jobs.create_job(
        smoke_request(version, base, max_steps=6, checkpoint_every=1), engineer, enqueue=False
    )
    claimed = jobs.claim(job.pk, "test")
    TrainingJob.objects.filter(pk=job.pk).update(cancel_requested=True)
    job = jobs.run_claimed(claimed)
    assert job.state == "cancelled" and job.last_checkpoint, (job.error_code, job.error_message)
    return job


@pytest.mark.django_db
def test_resume_refusals_are_explained(
    engineer, admin_user, make_user, curator, tiny_base, client_for, quiet_heartbeat
):
    version = make_version(curator, train=4, eval_=0)
    # queued, never ran: no checkpoint, and not resumable anyway
    queued = jobs.create_job(smoke_request(version, tiny_base), engineer, enqueue=False)
    with pytest.raises(jobs.JobRefused, match="still queued or running"):
        jobs.resume(queued, engineer)
    # cancelled before it ran: no checkpoint to resume from
    jobs.cancel(queued, engineer)
    with pytest.raises(jobs.JobRefused, match="no intact checkpoint"):
        jobs.resume(queued, engineer)
    client = client_for(engineer)
    page = client.get(reverse("training:job", args=[queued.pk])).content.decode()
    assert "Resume from checkpoint" not in page
    response = client.post(reverse("training:job_resume", args=[queued.pk]), follow=True)
    assert "no intact checkpoint to resume from" in response.content.decode()
    assert TrainingJob.objects.get(pk=queued.pk).state == "cancelled"

    # succeeded: nothing to resume
    done = jobs.create_job(smoke_request(version, tiny_base, max_steps=2), engineer, enqueue=False)
    done = jobs.run_claimed(jobs.claim(done.pk, "test"))
    assert done.state == "succeeded"
    with pytest.raises(jobs.JobRefused, match="already succeeded"):
        jobs.resume(done, engineer)

    # cancelled with a checkpoint: the button shows; another engineer may not resume it
    job = _cancelled_with_checkpoint(engineer, version, tiny_base)
    page = client.get(reverse("training:job", args=[job.pk])).content.decode()
    assert f"Resume from checkpoint (step {jobs.resumable_checkpoint(job)[0]})" in page
    stranger = make_user("eve", "engineer")
    assert "Resume from checkpoint" not in client_for(stranger).get(job.get_absolute_url()).content.decode()
    with pytest.raises(jobs.JobRefused, match="owner or an admin"):
        jobs.resume(job, stranger)

    # the newest checkpoint damaged: the trainer fails naming it, and resuming again is refused until
    # the damaged folder is deleted (then it resumes from the one before)
    checkpoint = Path(jobs.resumable_checkpoint(job)[1])
    for weights in checkpoint.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    jobs.resume(job, admin_user)  # an admin may resume anyone's job
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))
    assert job.state == "failed" and job.error_code == "corrupt_checkpoint", job.error_message
    with pytest.raises(jobs.JobRefused, match=f"newest checkpoint, {checkpoint.name}, is the damaged one"):
        jobs.resume(job, engineer)
    assert "Resume from checkpoint" not in client.get(job.get_absolute_url()).content.decode()
    # GET is refused, and so is a POST without a CSRF token
    assert client.get(reverse("training:job_resume", args=[job.pk])).status_code == 405
    strict = client_for(engineer, enforce_csrf_checks=True)
    assert strict.post(reverse("training:job_resume", args=[job.pk])).status_code == 403


@pytest.mark.django_db
def test_role_matrix_resume(client_for, make_user, engineer, admin_user, curator, tiny_base, quiet_heartbeat):
    version = make_version(curator, train=4, eval_=0)
    job = _cancelled_with_checkpoint(engineer, version, tiny_base)
    url = reverse("training:job_resume", args=[job.pk])
    assert client_for(None).post(url).status_code == 302  # anonymous → login
    for role in ("curator", "reviewer"):
        assert client_for(make_user(f"x-{role}", role)).post(url).status_code == 403, role
    assert TrainingJob.objects.get(pk=job.pk).state == "cancelled"
    response = client_for(admin_user).post(url)
    assert response.status_code == 302 and response.headers["Location"] == job.get_absolute_url()
    job.refresh_from_db()
    assert job.state == "queued" and not job.cancel_requested and job.finished_at is None
    (event,) = _events("training.job.resume", job)
    assert event["state"] == "cancelled" and event["attempt"] == 1 and event["step"] == job.checkpoint_step
    assert AuditEvent.objects.get(verb="training.job.resume", object_id=str(job.pk)).actor == admin_user


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_job_failed_mid_run_is_resumed_by_a_worker_from_its_checkpoint(
    start_worker, tiny_base, curator, engineer, client_for, settings
):
    """SIGKILL mid-run with a cap of one attempt: the watchdog fails the job (worker_lost). The engineer
    resumes it from the page; a fresh worker continues from the checkpoint and succeeds."""
    from studio.tasks import watchdog

    settings.STUDIO_JOB_MAX_ATTEMPTS = 1
    version = make_version(curator, train=16, eval_=2)
    first = start_worker("gpu", **WORKER_ENV)
    job = jobs.create_job(
        smoke_request(version, tiny_base, max_steps=60, checkpoint_every=3, batch_size=2, max_length=128),
        engineer,
    )
    wait_for(
        lambda: TrainingJob.objects.get(pk=job.pk).checkpoint_step >= 6, first, timeout=240, what="step 6"
    )
    first["proc"].send_signal(signal.SIGKILL)
    first["proc"].wait(30)
    settings.STUDIO_JOB_STALE_SECONDS = 2
    time.sleep(2.5)
    assert watchdog()["jobs"]["failed"] == [job.pk]
    failed = TrainingJob.objects.get(pk=job.pk)
    assert failed.state == "failed" and failed.error_code == "worker_lost"
    assert "stopped responding 1 times (limit 1)" in failed.error_message
    assert "resume the job from its last checkpoint" in failed.error_suggestion
    step, path = jobs.resumable_checkpoint(failed)
    assert step >= failed.checkpoint_step >= 6 and step < 60

    client = client_for(engineer)
    page = client.get(failed.get_absolute_url()).content.decode()
    assert f"Resume from checkpoint (step {step})" in page and "stopped responding 1 times" in page
    second = start_worker("gpu", **WORKER_ENV)
    response = client.post(reverse("training:job_resume", args=[job.pk]), follow=True)
    assert f"it resumes from its checkpoint at step {step}" in response.content.decode()
    wait_for(
        lambda: TrainingJob.objects.get(pk=job.pk).state not in ("queued", "running"),
        second,
        timeout=300,
        what="the resumed job",
    )
    done = TrainingJob.objects.get(pk=job.pk)
    assert done.state == "succeeded", (done.error_code, done.error_message, done.error_traceback[-2000:])
    assert done.attempt == 2 and done.attempt_started_step == step and done.step == 60
    assert not done.error_code and not done.error_message
    assert_curve_continues(done, 60, step)
    assert job_verbs(job) == [
        "training.job.create",
        "training.job.start",
        "training.job.fail",
        "training.job.resume",
        "training.job.start",
        "training.job.succeed",
    ]


@pytest.mark.django_db
def test_watchdog_budget_starts_afresh_after_a_resume(
    engineer, curator, tiny_base, settings, quiet_heartbeat
):
    """The attempt number keeps counting across a resume; the cap counts attempts since the resume."""
    settings.STUDIO_JOB_MAX_ATTEMPTS = 2
    version = make_version(curator, train=4, eval_=0)
    job = _cancelled_with_checkpoint(engineer, version, tiny_base)
    jobs.resume(job, engineer)
    old = timezone.now() - timezone.timedelta(seconds=settings.STUDIO_JOB_STALE_SECONDS + 5)

    def lose_worker():
        assert jobs.claim_next("w") is not None
        TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=old)
        return jobs.requeue_stale()

    assert lose_worker()["requeued"] == [job.pk]  # attempt 2, the first since the resume
    assert lose_worker()["failed"] == [job.pk]  # attempt 3, the second since the resume: cap reached
    job.refresh_from_db()
    assert job.attempt == 3 and "stopped responding 2 times (limit 2)" in job.error_message


@pytest.mark.django_db
def test_disk_full_suggestion_points_at_the_resume_action():
    from training_app.trainer.errors import DiskFull, explain

    error = explain(OSError(28, "No space left on device"))
    assert isinstance(error, DiskFull)
    assert "“Resume from checkpoint” on the job page" in error.suggestion
    assert "earlier checkpoints are intact" in error.suggestion


@pytest.mark.django_db
def test_disk_full_job_is_resumed_from_the_page_after_space_is_freed(
    small_disk,  # noqa: F811 - the fixture imported above
    settings,
    monkeypatch,
    tiny_base,
    curator,
    engineer,
    client_for,
    quiet_heartbeat,
):
    """A real size-limited filesystem fills up after the first checkpoint: the job fails with the disk-full
    reason, the page offers the resume its suggestion names, and once space is freed the same job
    continues from that checkpoint to the end."""
    from test_faults_services import fill_after_first_publish

    from training_app.trainer import run as trainer_run

    version = make_version(curator, train=16, eval_=2)
    settings.DATA_DIR = small_disk
    original_publish = trainer_run._atomic_publish
    fill_after_first_publish(monkeypatch, small_disk)
    job = jobs.create_job(
        smoke_request(version, tiny_base, max_steps=8, checkpoint_every=2, batch_size=2, max_length=128),
        engineer,
        enqueue=False,
    )
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))
    assert job.state == "failed" and job.error_code == "disk_full", (job.error_code, job.error_message)
    client = client_for(engineer)
    page = client.get(job.get_absolute_url()).content.decode()
    assert "Resume from checkpoint (step 2)" in page and "earlier checkpoints are intact" in page

    monkeypatch.setattr(trainer_run, "_atomic_publish", original_publish)
    (small_disk / "filler.bin").unlink()
    response = client.post(reverse("training:job_resume", args=[job.pk]), follow=True)
    assert "it resumes from its checkpoint at step 2" in response.content.decode()
    (event,) = _events("training.job.resume", job)
    assert event["reason"] == "disk_full" and event["state"] == "failed" and event["step"] == 2
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))  # what the gpu worker's run_next does
    assert job.state == "succeeded", (job.error_code, job.error_traceback[-2000:])
    assert job.attempt == 2 and job.attempt_started_step == 2 and job.step == 8
    assert "Resume from checkpoint" not in client.get(job.get_absolute_url()).content.decode()
