"""Training jobs through the studio: validation messages, estimates, queue order and priority, claim,
cancel, the watchdog, a real (tiny) run to a registry candidate, `manage.py train` and the role matrix."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from conftest import job_verbs, make_version, smoke_request
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from eval_app.models import ModelVersion
from studio.models import AuditEvent
from training_app.models import BaseModel, TrainingJob, TrainingMetric
from training_app.services import jobs, register_local_dir

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_heartbeat_thread_writes(settings):
    """These tests run inside one uncommitted transaction that a heartbeat thread (own connection)
    cannot see; the real heartbeat is covered by tests/test_training_worker.py."""
    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 3600


@pytest.fixture
def tiny_base(tiny_model_dir, admin_user):
    return register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)


@pytest.fixture
def sft_version(curator, tiny_base):
    return make_version(curator)


# --- validation -----------------------------------------------------------------------------------------


def test_dpo_on_sft_dataset_is_refused_with_plain_message(engineer, sft_version, tiny_base):
    req = smoke_request(sft_version, tiny_base)
    req.method = "dpo"
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any(
        "DPO needs a preference dataset version" in p and "support v1" in p for p in exc.value.problems
    )
    assert not TrainingJob.objects.exists()


def test_sft_method_on_preference_dataset_is_refused(engineer, curator, tiny_base):
    version = make_version(curator, kind="preference", name="prefs")
    req = smoke_request(version, tiny_base)
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("preference dataset; train it with DPO" in p for p in exc.value.problems)


def test_max_length_above_context_names_the_limit(engineer, sft_version, tiny_base):
    req = smoke_request(sft_version, tiny_base, max_length=4096)
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("Max length 4096 is above tiny-llama's context of 512 tokens" in p for p in exc.value.problems)


def test_version_without_train_split_is_refused(engineer, curator, tiny_base):
    version = make_version(curator, name="evalonly", train=0, eval_=3)
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(smoke_request(version, tiny_base), engineer)
    assert any("has no examples in the train split" in p for p in exc.value.problems)


def test_eval_every_without_eval_split_is_refused(engineer, curator, tiny_base):
    version = make_version(curator, name="noeval", eval_=0)
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(smoke_request(version, tiny_base, eval_every=2), engineer)
    assert any("needs an eval split" in p for p in exc.value.problems)


def test_qlora_without_bitsandbytes_is_refused(engineer, sft_version, tiny_base, monkeypatch):
    monkeypatch.setattr(jobs, "_bitsandbytes_available", lambda: False)
    req = smoke_request(sft_version, tiny_base)
    req.method = "qlora"
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("QLoRA needs the bitsandbytes package" in p for p in exc.value.problems)


def test_retired_base_model_and_bad_numbers_are_refused(engineer, sft_version, tiny_base):
    tiny_base.status = BaseModel.Status.RETIRED
    tiny_base.save()
    req = smoke_request(sft_version, tiny_base, learning_rate="fast", batch_size=0, lr_scheduler="wavy")
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    text = " | ".join(exc.value.problems)
    assert "tiny-llama is retired" in text
    assert "Learning rate: “fast” is not a valid number." in text
    assert "Batch size must be between 1 and 1024 (got 0)." in text
    assert "Scheduler must be one of" in text


def test_replay_rules(engineer, sft_version, tiny_base):
    req = smoke_request(sft_version, tiny_base)
    req.replay_version, req.replay_percent = sft_version, 20
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("earlier dataset version" in p for p in exc.value.problems)
    req.replay_version, req.replay_percent = None, 10
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("Choose the dataset version to replay" in p for p in exc.value.problems)
    # the share's bounds as they are checked (0.5% is a valid share, 150% is not)
    req.replay_version, req.replay_percent = sft_version, 150
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert "Replay share must be above 0 and at most 100 percent (got 150)." in exc.value.problems


# --- estimate --------------------------------------------------------------------------------------------


def test_estimate_counts_tokens_steps_and_memory(sft_version, tiny_base):
    config, problems = jobs.normalise_config(
        {**jobs.PRESETS["smoke"]["config"], "max_steps": None, "epochs": 2}
    )
    assert problems == []
    figures = jobs.estimate(dataset_version=sft_version, base_model=tiny_base, method="lora", config=config)
    lengths = [12 + i for i in range(8)]  # the 8 train examples' token counts
    assert figures["examples"] == 8
    assert figures["tokens_per_epoch"] == sum(lengths)
    assert figures["tokens_total"] == 2 * sum(lengths)
    assert figures["steps_per_epoch"] == 4  # 8 examples / batch 2 / accumulation 1
    assert figures["steps"] == 8
    memory = figures["memory"]
    assert memory["total_bytes"] > memory["weights_bytes"] > 0
    assert memory["fits"] is True


def test_estimate_warns_with_a_fix_on_a_small_device(sft_version, tiny_base):
    config, _ = jobs.normalise_config(
        {**jobs.PRESETS["smoke"]["config"], "batch_size": 64, "max_length": 512}
    )
    tiny_device = {"name": "cuda:0", "kind": "cuda", "label": "toy GPU", "total_bytes": 2_000_000}
    figures = jobs.estimate(
        dataset_version=sft_version, base_model=tiny_base, method="sft", config=config, device=tiny_device
    )
    assert figures["memory"]["fits"] is False
    assert figures["memory"]["suggestion"]


# --- queue -----------------------------------------------------------------------------------------------


def test_queue_runs_highest_priority_first_and_claims_once(engineer, sft_version, tiny_base, make_user):
    other = make_user("otto", "engineer")
    first = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    second = jobs.create_job(smoke_request(sft_version, tiny_base), other)
    assert jobs.queue_positions() == {first.pk: 1, second.pk: 2}
    jobs.set_priority(second, +1, other)
    assert jobs.queue_positions() == {second.pk: 1, first.pk: 2}
    with pytest.raises(jobs.JobRefused):
        jobs.set_priority(first, +5, other)  # not the owner, not an admin
    claimed = jobs.claim_next("w1")
    assert claimed.pk == second.pk and claimed.state == "running" and claimed.attempt == 1
    assert jobs.claim(second.pk, "w2") is None  # never run twice at once
    assert jobs.claim_next("w2").pk == first.pk
    assert jobs.claim_next("w3") is None


def test_admin_may_reprioritise_anyones_job(engineer, admin_user, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    jobs.set_priority(job, -1, admin_user)
    job.refresh_from_db()
    assert job.priority == -1


def test_cancel_queued_job_is_immediate_and_audited(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    jobs.cancel(job, engineer)
    job.refresh_from_db()
    assert job.state == "cancelled" and job.finished_at
    assert jobs.claim_next("w") is None
    assert AuditEvent.objects.filter(verb="training.job.cancel", object_id=str(job.pk)).exists()


def test_watchdog_requeues_stale_job_then_fails_after_max_attempts(
    engineer, sft_version, tiny_base, settings
):
    settings.STUDIO_JOB_MAX_ATTEMPTS = 2
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    jobs.claim_next("w1")
    old = timezone.now() - timezone.timedelta(seconds=settings.STUDIO_JOB_STALE_SECONDS + 5)
    TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=old)
    assert jobs.requeue_stale()["requeued"] == [job.pk]
    job.refresh_from_db()
    assert job.state == "queued" and job.attempt == 1
    jobs.claim_next("w2")
    TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=old)
    assert jobs.requeue_stale()["failed"] == [job.pk]
    job.refresh_from_db()
    assert job.state == "failed" and job.error_code == "worker_lost"
    assert "stopped responding 2 times" in job.error_message


def test_fresh_heartbeat_is_left_alone(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    jobs.claim_next("w1")
    assert jobs.requeue_stale() == {"requeued": [], "failed": [], "cancelled": []}
    job.refresh_from_db()
    assert job.state == "running"


# --- a real run (tiny model, in-process) -------------------------------------------------------------


def test_run_creates_candidate_version_with_lineage_and_artifacts(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base, max_steps=4, checkpoint_every=2), engineer)
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))
    assert job.state == "succeeded", (job.error_code, job.error_message, job.error_traceback)
    assert job.step == 4
    losses = list(job.metrics.filter(name="loss").order_by("step").values_list("step", flat=True))
    assert losses == [1, 2, 3, 4]
    version = ModelVersion.objects.get(training_job=job)
    assert version.registered_model.name == "support" and version.number == 1
    assert version.dataset_sha256 == sft_version.sha256 and version.status == "candidate"
    final = Path(job.artifacts_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_config.json", "metrics.json"):
        assert (final / name).is_file(), name
    card = (final / "model_card.md").read_text()
    assert sft_version.sha256 in card and "tiny-llama" in card and "LoRA" in card
    assert "train_loss" in job.final_metrics
    # a merged full model on request (the Celery task calls jobs.merge)
    jobs.request_merge(job, engineer)
    merged = jobs.merge(job)
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert "merged/config.json" in {f["name"] for f in jobs.artifact_files(job)}
    with pytest.raises(jobs.JobRefused, match="already exists"):
        jobs.request_merge(job, engineer)


def test_cancel_flag_stops_running_job_and_keeps_checkpoint(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base, max_steps=50, checkpoint_every=1), engineer)
    claimed = jobs.claim(job.pk, "test")
    TrainingJob.objects.filter(pk=job.pk).update(cancel_requested=True)
    job = jobs.run_claimed(claimed)
    assert job.state == "cancelled"
    assert job.step <= 1
    assert job.last_checkpoint and Path(job.last_checkpoint).is_dir()
    assert not ModelVersion.objects.filter(training_job=job).exists()


def test_failure_is_explained_in_plain_words(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    claimed = jobs.claim(job.pk, "test")
    (Path(tiny_base.local_dir) / "config.json").rename(Path(tiny_base.local_dir) / "config.json.bak")
    try:
        job = jobs.run_claimed(claimed)
    finally:
        (Path(tiny_base.local_dir) / "config.json.bak").rename(Path(tiny_base.local_dir) / "config.json")
    assert job.state == "failed"
    assert job.error_message and job.error_traceback
    assert "Traceback" in job.error_traceback


# --- manage.py train -------------------------------------------------------------------------------------


def test_train_command_wait_prints_job_then_version_last(engineer, sft_version, tiny_base):
    out = StringIO()
    call_command(
        "train",
        "--dataset-version",
        str(sft_version.pk),
        "--base-model",
        "tiny-llama",
        "--method",
        "lora",
        "--preset",
        "smoke",
        "--max-steps",
        "2",
        "--wait",
        "--by",
        engineer.username,
        stdout=out,
    )
    lines = out.getvalue().strip().splitlines()
    job = TrainingJob.objects.get()
    assert lines[0] == f"job {job.pk}"
    assert lines[-1] == str(job.model_version.pk)
    assert any(line.startswith("step 2/2") for line in lines)


def test_train_command_enqueues_without_wait(engineer, sft_version, tiny_base):
    out = StringIO()
    call_command(
        "train", "--dataset-version", str(sft_version.pk), "--base-model", "tiny-llama",
        "--method", "lora", "--max-steps", "3", "--by", engineer.username, stdout=out,
    )  # fmt: skip
    job = TrainingJob.objects.get()
    assert out.getvalue().strip() == f"job {job.pk}"
    assert job.state == "queued" and job.config["max_steps"] == 3


def test_train_command_reports_reasons(engineer, sft_version, tiny_base, reviewer):
    with pytest.raises(CommandError, match="DPO needs a preference dataset version"):
        call_command(
            "train", "--dataset-version", str(sft_version.pk), "--base-model", "tiny-llama",
            "--method", "dpo", "--by", engineer.username, stdout=StringIO(),
        )  # fmt: skip
    with pytest.raises(CommandError, match="does not exist"):
        call_command("train", "--dataset-version", "999", "--base-model", "tiny-llama", stdout=StringIO())
    with pytest.raises(CommandError, match="not an engineer"):
        call_command(
            "train", "--dataset-version", str(sft_version.pk), "--base-model", "tiny-llama",
            "--by", reviewer.username, stdout=StringIO(),
        )  # fmt: skip


# --- pages -----------------------------------------------------------------------------------------------


def test_job_form_launches_and_pages_render(client_for, engineer, sft_version, tiny_base):
    client = client_for(engineer)
    page = client.get(reverse("training:job_new") + "?preset=smoke")
    assert page.status_code == 200 and b"Smoke test" in page.content
    data = {
        **{k: v for k, v in page.context["form"].initial.items() if v is not None},
        "dataset_version": sft_version.pk,
        "base_model": tiny_base.pk,
    }
    data = {k: v for k, v in data.items() if v is not False}
    estimate = client.post(reverse("training:job_estimate"), data)
    assert (
        estimate.status_code == 200
        and b"Tokens in all" in estimate.content
        and b"Fits on" in estimate.content
    )
    bad = client.post(reverse("training:job_estimate"), {**data, "max_length": 9999})
    assert b"above tiny-llama&#x27;s context of 512 tokens" in bad.content
    response = client.post(reverse("training:job_new"), data)
    job = TrainingJob.objects.get()
    assert response.status_code == 302 and response.url == job.get_absolute_url()
    assert job.method == "lora" and job.config["max_steps"] == 5 and job.created_by == engineer
    detail = client.get(job.get_absolute_url())
    assert detail.status_code == 200 and b"position 1 in the queue" in detail.content
    # the configuration is listed in the form's order whatever order the database kept the keys in
    shown = [k for k, _label, _value in detail.context["config_items"]]
    assert sorted(shown) == sorted(job.config)
    assert shown == [f for f in jobs.CONFIG_FIELDS if f in job.config] + sorted(
        k for k in job.config if k not in jobs.CONFIG_FIELDS
    )
    # with the form's labels and values as the form shows them (not Python's repr of lists and booleans)
    items = {k: (label, value) for k, label, value in detail.context["config_items"]}
    assert items["lora_r"] == ("LoRA r", str(job.config["lora_r"]))
    assert items["target_modules"][1] == " ".join(job.config["target_modules"])
    assert items["assistant_only_loss"][1] == ("on" if job.config["assistant_only_loss"] else "off")
    assert "[&#x27;" not in detail.content.decode() and "<code>False</code>" not in detail.content.decode()
    queue = client.get(reverse("training:jobs"))
    assert queue.status_code == 200 and f"#{job.pk}".encode() in queue.content
    assert client.get(reverse("training:job_live", args=[job.pk])).status_code == 200


def test_job_form_shows_refusal_on_page(client_for, engineer, sft_version, tiny_base):
    client = client_for(engineer)
    data = {**jobs.PRESETS["smoke"]["config"], "method": "dpo", "dataset_version": sft_version.pk,
            "base_model": tiny_base.pk, "target_modules": "q_proj v_proj", "max_steps": 5}  # fmt: skip
    data = {k: v for k, v in data.items() if v is not False and v is not None}
    response = client.post(reverse("training:job_new"), data)
    assert response.status_code == 200
    assert b"DPO needs a preference dataset version" in response.content
    assert not TrainingJob.objects.exists()


def test_live_page_shows_curve_failure_and_traceback(client_for, engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    TrainingMetric.objects.bulk_create(
        [TrainingMetric(job=job, step=s, name="loss", value=3.0 - s / 10) for s in range(1, 4)]
    )
    TrainingJob.objects.filter(pk=job.pk).update(
        state="failed",
        error_code="oom",
        error_message="The device ran out of memory at step 3.",
        error_suggestion="Use a smaller batch size, a shorter max length, or QLoRA.",
        error_traceback="Traceback (most recent call last):\n<script>alert(1)</script>",
    )
    page = client_for(engineer).get(job.get_absolute_url())
    body = page.content.decode()
    assert "The device ran out of memory at step 3." in body and "smaller batch size" in body
    assert "Show the traceback" in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<script>alert(1)" not in body
    assert "train loss" in body  # the chart's series


def test_artifact_download_is_confined_to_the_job_dir(client_for, engineer, sft_version, tiny_base, tmp_path):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    final = job.output_dir / "final"
    final.mkdir(parents=True)
    (final / "model_card.md").write_text("# card")
    (job.output_dir / "secret.txt").write_text("not an artifact")
    TrainingJob.objects.filter(pk=job.pk).update(state="succeeded", artifacts_dir=str(final))
    client = client_for(engineer)
    ok = client.get(reverse("training:job_artifact", args=[job.pk, "model_card.md"]))
    assert ok.status_code == 200 and b"".join(ok.streaming_content) == b"# card"
    assert client.get(reverse("training:job_artifact", args=[job.pk, "../secret.txt"])).status_code == 404


ROLE_MATRIX = [
    ("training:jobs", {"curator": 403, "reviewer": 403, "engineer": 200, "admin": 200}),
    ("training:job_new", {"curator": 403, "reviewer": 403, "engineer": 200, "admin": 200}),
    ("training:base_models", {"curator": 200, "reviewer": 403, "engineer": 200, "admin": 200}),
]


@pytest.mark.parametrize(("name", "expected"), ROLE_MATRIX)
def test_role_matrix_pages(client_for, roles, make_user, client, name, expected):
    assert client.get(reverse(name)).status_code == 302  # anonymous → login
    for role, status in expected.items():
        user = make_user(f"u-{role}", role)
        assert client_for(user).get(reverse(name)).status_code == status, role


def test_role_matrix_job_actions(client_for, make_user, engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    urls = [
        ("get", reverse("training:job", args=[job.pk])),
        ("get", reverse("training:job_live", args=[job.pk])),
        ("post", reverse("training:job_cancel", args=[job.pk])),
        ("post", reverse("training:job_priority", args=[job.pk])),
        ("post", reverse("training:job_merge", args=[job.pk])),
        ("post", reverse("training:job_resume", args=[job.pk])),
        ("post", reverse("training:job_estimate")),
        ("get", reverse("training:job_artifact", args=[job.pk, "model_card.md"])),
    ]
    for role in ("curator", "reviewer"):
        client = client_for(make_user(f"x-{role}", role))
        for method, url in urls:
            assert getattr(client, method)(url).status_code == 403, (role, url)
    # another engineer sees the job but cannot cancel or move it
    stranger = client_for(make_user("eve", "engineer"))
    stranger.post(reverse("training:job_cancel", args=[job.pk]))
    stranger.post(reverse("training:job_priority", args=[job.pk]), {"direction": "up"})
    stranger.post(reverse("training:job_resume", args=[job.pk]))
    job.refresh_from_db()
    assert job.state == "queued" and job.priority == 0
    # GET on a state-changing URL is refused
    assert client_for(engineer).get(reverse("training:job_cancel", args=[job.pk])).status_code == 405
    assert client_for(engineer).get(reverse("training:job_resume", args=[job.pk])).status_code == 405


# --- base models: admins add them in the UI -----------------------------------------------------------


def test_admin_adds_local_dir_base_model(client_for, admin_user, tiny_model_dir):
    client = client_for(admin_user)
    data = {"name": "tiny-two", "source_kind": "local_dir", "source": str(tiny_model_dir), "license": "MIT"}
    response = client.post(reverse("training:base_model_add"), data)
    assert response.status_code == 302
    model = BaseModel.objects.get(name="tiny-two")
    assert model.status == "active" and model.context_length == 512 and model.parameters > 0
    assert AuditEvent.objects.filter(verb="base_model.register", object_id=str(model.pk)).exists()


def test_add_base_model_refusals_are_explained(client_for, admin_user, tmp_path, settings):
    client = client_for(admin_user)
    url = reverse("training:base_model_add")
    cases = [
        ({"source_kind": "local_dir", "source": str(tmp_path)}, "is not a Hugging Face model directory"),
        (
            {"source_kind": "gguf", "source": str(tmp_path / "missing.gguf")},
            "is not a .gguf file on this server",
        ),
        ({"source_kind": "hub", "source": "org/model"}, "does not reach a model hub"),
        ({"name": "bad name!", "source_kind": "local_dir", "source": str(tmp_path)}, "Name: use letters"),
    ]
    for extra, message in cases:
        response = client.post(url, {"name": "m1", **extra})
        assert response.status_code == 200 and message.encode() in response.content, message
    settings.STUDIO_HUB_ENABLED = True
    response = client.post(url, {"name": "m1", "source_kind": "hub", "source": "not a hub id"})
    assert b"a hub id looks like organisation/model-name" in response.content
    assert not BaseModel.objects.exists()


def test_gguf_base_model_is_prepared_by_a_worker_and_failure_is_recorded(admin_user, tmp_path):
    from training_app.services.base_models import add_base_model, prepare

    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file")
    model = add_base_model("broken", "gguf", str(bogus), admin_user)
    assert model.status == "preparing"
    model = prepare(model)
    assert model.status == "failed" and model.error


def test_only_admins_add_base_models(client_for, engineer, curator):
    for user in (engineer, curator):
        assert client_for(user).get(reverse("training:base_model_add")).status_code == 403


def test_corrupt_checkpoint_on_resume_fails_the_job_with_its_name(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base, max_steps=50, checkpoint_every=1), engineer)
    claimed = jobs.claim(job.pk, "test")
    TrainingJob.objects.filter(pk=job.pk).update(cancel_requested=True)
    job = jobs.run_claimed(claimed)
    checkpoint = Path(job.last_checkpoint)
    for weights in checkpoint.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # truncated, as a crash mid-copy would leave it
    TrainingJob.objects.filter(pk=job.pk).update(state="queued", cancel_requested=False)
    job = jobs.run_claimed(jobs.claim(job.pk, "test"))
    assert job.state == "failed" and job.error_code == "corrupt_checkpoint"
    assert checkpoint.name in job.error_message
    assert job.error_suggestion


def test_catalog_shows_which_devices_each_model_fits(client_for, engineer, tiny_base):
    from training_app.models import ComputeNode

    ComputeNode.objects.create(
        hostname="gpu0@node1",
        devices=[{"name": "cuda:0", "kind": "cuda", "label": "toy GPU", "total_bytes": 1_000}],
        last_seen=timezone.now(),
    )
    ComputeNode.objects.create(
        hostname="gpu0@node2",
        devices=[{"name": "cuda:0", "kind": "cuda", "label": "big GPU", "total_bytes": 80 * 2**30}],
        last_seen=timezone.now(),
    )
    body = client_for(engineer).get(reverse("training:base_models")).content.decode()
    assert "gpu0@node1" in body and "gpu0@node2" in body
    fit = jobs.device_fit(tiny_base, jobs.known_devices())
    assert {(f["device"], f["fits"]) for f in fit} == {("toy GPU", False), ("big GPU", True)}
    assert "too large" in body and "fits" in body


# --- review findings: merge rights and state, odd base models, limits ------------------------------------


def _succeeded_lora_job(engineer, sft_version, tiny_base):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    final = job.output_dir / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    TrainingJob.objects.filter(pk=job.pk).update(state="succeeded", artifacts_dir=str(final))
    job.refresh_from_db()
    return job


def test_only_the_owner_or_an_admin_merges_and_only_once_at_a_time(
    client_for, make_user, engineer, admin_user, sft_version, tiny_base, django_capture_on_commit_callbacks
):
    job = _succeeded_lora_job(engineer, sft_version, tiny_base)
    stranger = make_user("eve", "engineer")
    with pytest.raises(jobs.JobRefused, match="owner or an admin"):
        jobs.request_merge(job, stranger)
    response = client_for(stranger).post(reverse("training:job_merge", args=[job.pk]), follow=True)
    assert "owner or an admin" in response.content.decode()
    job.refresh_from_db()
    assert job.merge_state == "" and "training.job.merge" not in job_verbs(job)

    with django_capture_on_commit_callbacks() as callbacks:
        jobs.request_merge(job, engineer)
    assert len(callbacks) == 1  # one merge task
    job.refresh_from_db()
    assert job.merge_state == "pending"
    with pytest.raises(jobs.JobRefused, match="already under way"):
        jobs.request_merge(job, admin_user)
    body = client_for(engineer).get(reverse("training:job_live", args=[job.pk])).content.decode()
    assert "Merging the adapter" in body and "job_merge" not in body and "/merge/" not in body


def test_a_failed_merge_is_recorded_and_can_be_retried(engineer, sft_version, tiny_base, monkeypatch):
    from training_app.trainer import run

    job = _succeeded_lora_job(engineer, sft_version, tiny_base)
    jobs.request_merge(job, engineer)

    def broken(base_dir, adapter_dir, out_dir):
        raise OSError("disk full")

    monkeypatch.setattr(run, "merge_adapter", broken)
    assert jobs.merge(job) is None
    job.refresh_from_db()
    assert job.merge_state == "failed" and "OSError" in job.merge_error and "disk full" not in job.merge_error
    assert not (Path(job.artifacts_dir) / "merged").exists()
    assert not list(Path(job.artifacts_dir).glob(".merged-*"))

    def works(base_dir, adapter_dir, out_dir):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(run, "merge_adapter", works)
    jobs.request_merge(job, engineer)  # a failed merge may be asked again
    assert jobs.merge(job) == Path(job.artifacts_dir) / "merged"
    job.refresh_from_db()
    assert job.merge_state == "done" and job.merge_error == ""
    verbs = job_verbs(job)
    assert verbs.count("training.job.merge") == 2
    assert "training.job.merge_fail" in verbs and "training.job.merged" in verbs


def test_base_model_with_missing_files_or_gpt2_config_never_breaks_the_pages(
    client_for, engineer, admin_user, sft_version, tiny_base, tmp_path
):
    import json
    import shutil

    from training_app.trainer.estimate import UnknownModelShape, check_model_shape

    # GPT-2 style names are understood
    check_model_shape({"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100})
    with pytest.raises(UnknownModelShape, match="hidden_size"):
        check_model_shape({"vocab_size": 100})
    # a registered model whose directory disappeared
    copy = tmp_path / "gone"
    shutil.copytree(tiny_base.local_dir, copy)
    gone = register_local_dir("gone", copy, admin_user)
    shutil.rmtree(copy)
    page = client_for(engineer).get(reverse("training:base_models"))
    assert page.status_code == 200 and "unknown" in page.content.decode()
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(smoke_request(sft_version, gone), engineer)
    assert any("files are missing or unreadable" in p for p in exc.value.problems)
    client = client_for(engineer)
    page = client.get(reverse("training:job_new") + "?preset=smoke")
    data = {**page.context["form"].initial, "dataset_version": sft_version.pk, "base_model": gone.pk}
    data = {k: v for k, v in data.items() if v is not None and v is not False}
    response = client.post(reverse("training:job_estimate"), data)
    assert response.status_code == 200 and "files are missing" in response.content.decode()
    # a model whose config gives no sizes is refused when added
    odd = tmp_path / "odd"
    shutil.copytree(tiny_base.local_dir, odd)
    (odd / "config.json").write_text(json.dumps({"architectures": ["Odd"], "vocab_size": 100}))
    with pytest.raises(UnknownModelShape):
        register_local_dir("odd", odd, admin_user)
    assert not BaseModel.objects.filter(name="odd").exists()


def test_limits_that_would_overflow_or_fail_on_the_worker_are_refused_before_launch(
    engineer, curator, sft_version, tiny_base
):
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(smoke_request(sft_version, tiny_base, max_steps=10**19), engineer)
    assert any("Max steps must be between 1 and 10,000,000" in p for p in exc.value.problems)
    req = smoke_request(sft_version, tiny_base)
    req.method, req.merge = "sft", True
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("Merging only applies to adapter methods" in p for p in exc.value.problems)
    prefs = make_version(curator, kind="preference", name="prefs")
    req = smoke_request(prefs, tiny_base, packing=True)
    req.method = "dpo"
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(req, engineer)
    assert any("Packing is not available for DPO" in p for p in exc.value.problems)
    assert not TrainingJob.objects.exists()


def test_packed_step_estimate_is_the_trainers_packing(sft_version, tiny_base):
    from training_app.trainer.data import pack_examples

    config, problems = jobs.normalise_config(
        {**smoke_request(sft_version, tiny_base).config, "packing": True}
    )
    assert not problems
    lengths = list(sft_version.examples.filter(split="train").values_list("token_count", flat=True))
    config["max_length"] = max(lengths) + 1  # two examples rarely share a row: ceil(sum/len) undercounts
    figures = jobs.estimate(dataset_version=sft_version, base_model=tiny_base, method="lora", config=config)
    truncated = [min(n, config["max_length"]) for n in lengths]
    assert figures["rows"] == len(pack_examples(truncated, config["max_length"]))


def test_nul_byte_in_an_artifact_name_is_not_found(client_for, engineer, sft_version, tiny_base):
    job = _succeeded_lora_job(engineer, sft_version, tiny_base)
    client = client_for(engineer)
    assert client.get(f"/training/jobs/{job.pk}/artifacts/a%00b").status_code == 404
    assert jobs.artifact_path(job, "a\x00b") is None


def test_base_model_status_changes_follow_the_lifecycle(client_for, admin_user, tiny_base):
    client = client_for(admin_user)
    url = reverse("training:base_model_status", args=[tiny_base.pk])
    events = AuditEvent.objects.filter(verb__startswith="base_model.").count()
    client.post(url, {"status": "active"})  # already active: nothing happens, nothing audited
    assert AuditEvent.objects.filter(verb__startswith="base_model.").count() == events
    client.post(url, {"status": "retired"})
    tiny_base.refresh_from_db()
    assert tiny_base.status == "retired"
    register_local_dir("tiny-llama", tiny_base.local_dir, admin_user)  # a refresh keeps it retired
    tiny_base.refresh_from_db()
    assert tiny_base.status == "retired"
    client.post(url, {"status": "active"})
    tiny_base.refresh_from_db()
    assert tiny_base.status == "active"
    failed = BaseModel.objects.create(name="broken", source_kind="gguf", source="/x.gguf", status="failed")
    response = client.post(
        reverse("training:base_model_status", args=[failed.pk]), {"status": "active"}, follow=True
    )
    failed.refresh_from_db()
    assert failed.status == "failed" and "cannot be made available" in response.content.decode()
    assert "Reactivate" not in client.get(reverse("training:base_models")).content.decode().split("broken")[1]
