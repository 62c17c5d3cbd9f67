"""Training jobs on real `celery worker -Q gpu` processes (PostgreSQL + Redis in CI, SQLite + the
filesystem broker locally): a worker killed with SIGKILL mid-run, the watchdog requeue, a second
worker resuming from the checkpoint with a continuous loss curve; cancel through a live worker."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import assert_curve_continues, job_verbs, make_version, smoke_request, wait_for

from eval_app.models import ModelVersion
from training_app.models import ComputeNode, TrainingJob, TrainingMetric
from training_app.services import jobs, register_local_dir

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

WORKER_ENV = {"STUDIO_JOB_HEARTBEAT_SECONDS": "0.5"}


@pytest.fixture
def setup(tiny_model_dir, curator, engineer, admin_user):
    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_version(curator, train=16, eval_=2)
    return base, version


def _job(pk):
    return TrainingJob.objects.get(pk=pk)


def test_sigkilled_worker_job_is_requeued_and_resumes_from_checkpoint(
    start_worker, setup, engineer, settings
):
    base, version = setup
    first = start_worker("gpu", **WORKER_ENV)
    job = jobs.create_job(
        smoke_request(version, base, max_steps=120, checkpoint_every=3, batch_size=2, max_length=128),
        engineer,
    )
    wait_for(lambda: _job(job.pk).checkpoint_step >= 6, first, timeout=240, what="a checkpoint at step 6")
    running = _job(job.pk)
    assert running.state == "running" and running.attempt == 1
    assert ComputeNode.objects.exists()  # the worker reported its devices when it started
    first["proc"].send_signal(signal.SIGKILL)
    first["proc"].wait(30)
    killed_at = _job(job.pk)
    assert killed_at.state == "running"  # nobody has noticed yet
    checkpoint_step = killed_at.checkpoint_step
    assert 0 < checkpoint_step < 120

    # the beat watchdog finds the stopped heartbeat and requeues the job (one message on queue "gpu")
    settings.STUDIO_JOB_STALE_SECONDS = 2
    import time

    time.sleep(2.5)
    from studio.tasks import watchdog

    assert watchdog()["jobs"]["requeued"] == [job.pk]
    assert _job(job.pk).state == "queued"

    second = start_worker("gpu", **WORKER_ENV)
    wait_for(
        lambda: _job(job.pk).state not in ("queued", "running"), second, timeout=300, what="the resumed job"
    )
    done = _job(job.pk)
    assert done.state == "succeeded", (done.error_code, done.error_message, done.error_traceback[-2000:])
    assert done.attempt == 2 and done.step == 120
    # the worker may have written one more checkpoint between its last database update and the kill
    resumed_step = done.attempt_started_step
    assert resumed_step in (checkpoint_step, checkpoint_step + 3), (resumed_step, checkpoint_step)
    checkpoint_step = resumed_step
    # the loss curve continues where the checkpoint left it: every step once, no gap, no duplicate
    assert_curve_continues(done, 120, checkpoint_step)
    assert job_verbs(job) == [
        "training.job.create",
        "training.job.start",
        "training.job.requeue",
        "training.job.start",
        "training.job.succeed",
    ]
    assert TrainingMetric.objects.filter(job=done, name="loss").count() == 120


def test_cancel_reaches_a_running_worker_within_a_step(start_worker, setup, engineer):
    base, version = setup
    worker = start_worker("gpu", **WORKER_ENV)
    job = jobs.create_job(
        smoke_request(version, base, max_steps=500, checkpoint_every=50, batch_size=2, max_length=128),
        engineer,
    )
    wait_for(lambda: _job(job.pk).step >= 3, worker, timeout=240, what="the job to start stepping")
    jobs.cancel(_job(job.pk), engineer)
    wait_for(lambda: _job(job.pk).state == "cancelled", worker, timeout=60, what="the cancel")
    cancelled = _job(job.pk)
    assert cancelled.step < 500
    assert cancelled.last_checkpoint and Path(cancelled.last_checkpoint).is_dir()
    assert not ModelVersion.objects.filter(training_job=cancelled).exists()
