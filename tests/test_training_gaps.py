"""Two training gaps closed: retiring a base model stops the jobs still queued on it (and a worker never
starts a job whose base model is retired), and the pre-launch token estimate counts with the job's own
base model's tokenizer whenever the dataset's stored counts were made with another one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model, job_verbs, make_version, smoke_request
from django.urls import reverse
from django.utils import timezone
from test_training_jobs import _no_heartbeat_thread_writes as _no_heartbeat_thread_writes  # noqa: F401
from test_training_jobs import sft_version as sft_version  # noqa: F401 - the fixtures
from test_training_jobs import tiny_base as tiny_base  # noqa: F401

from datasets_app import tokens
from datasets_app.models import Example, VersionExample
from studio import audit
from studio.models import AuditEvent
from training_app import tasks
from training_app.models import BaseModel, TrainingJob
from training_app.services import jobs, register_local_dir, set_status
from training_app.trainer.data import replay_picks

pytestmark = pytest.mark.django_db


@pytest.fixture
def other_base(tiny_model_dir, admin_user):
    """A second available base model (the same weights; only the jobs' base model differs)."""
    return register_local_dir("tiny-two", Path(tiny_model_dir), admin_user)


def jobs_retire(base: BaseModel, user):
    """An admin retires `base` (the service the catalog's Retire button calls)."""
    return set_status(base, BaseModel.Status.RETIRED, user)


def _retire_event(base: BaseModel) -> AuditEvent:
    return AuditEvent.objects.filter(verb="base_model.retired", object_id=str(base.pk)).latest("id")


def _job_event(job: TrainingJob, verb: str) -> AuditEvent:
    return AuditEvent.objects.filter(verb=verb, object_type="trainingjob", object_id=str(job.pk)).latest("id")


# =====================================================================================================
# Defect 1: retiring a base model and the jobs queued on it
# =====================================================================================================


def test_retiring_a_base_model_cancels_its_queued_jobs_and_leaves_running_ones(
    client_for, admin_user, engineer, sft_version, tiny_base, other_base
):
    running = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    assert jobs.claim_next("w1").pk == running.pk
    queued = [jobs.create_job(smoke_request(sft_version, tiny_base), engineer) for _ in range(2)]
    elsewhere = jobs.create_job(smoke_request(sft_version, other_base), engineer)
    admin = client_for(admin_user)

    # the button's confirmation says what the retire will do to the jobs on the model
    catalog = admin.get(reverse("training:base_models")).content.decode()
    assert (
        "Retire tiny-llama? No new job can be launched on it. 2 queued jobs on it will be cancelled. "
        "1 running job on it is left to finish." in catalog
    )

    response = admin.post(
        reverse("training:base_model_status", args=[tiny_base.pk]), {"status": "retired"}, follow=True
    )
    shown = [str(m) for m in response.context["messages"]]
    ids = ", ".join(f"#{job.pk}" for job in queued)
    assert shown == [
        f"tiny-llama is now retired. 2 jobs still queued on it were cancelled ({ids}); each job's page "
        "tells its owner why and to launch again on another base model. 1 job already running on it is "
        "left to finish."
    ]
    tiny_base.refresh_from_db()
    assert tiny_base.status == BaseModel.Status.RETIRED
    for job in queued:
        job.refresh_from_db()
        assert job.state == TrainingJob.State.CANCELLED and job.finished_at is not None
        assert job.error_code == "base_model_retired"
        assert (
            job.error_message
            == "Cancelled: the base model tiny-llama was retired by ada before this job started."
        )
        assert job.error_suggestion == "Choose another base model and launch the job again."
        assert job.attempt == 0 and job.started_at is None  # never ran
        event = _job_event(job, "training.job.cancel")
        assert event.actor == admin_user and event.data["reason"] == "base_model_retired"
        assert job_verbs(job) == ["training.job.create", "training.job.cancel"]
    retire = _retire_event(tiny_base)
    assert retire.actor == admin_user
    assert retire.data == {"cancelled_jobs": [job.pk for job in queued], "running_jobs": 1}

    running.refresh_from_db()
    assert running.state == TrainingJob.State.RUNNING and not running.cancel_requested
    elsewhere.refresh_from_db()
    assert elsewhere.state == TrainingJob.State.QUEUED
    assert jobs.claim_next("w2").pk == elsewhere.pk  # the cancelled jobs are out of the queue

    # the owner reads why on the job's page, with what to do
    page = client_for(engineer).get(queued[0].get_absolute_url()).content.decode()
    assert "Cancelled: the base model tiny-llama was retired by ada before this job started." in page
    assert "What to do: Choose another base model and launch the job again." in page
    assert "Resume from checkpoint" not in page and "Cancel job" not in page


def test_retiring_a_model_with_no_queued_job_says_so(client_for, admin_user, tiny_base):
    response = client_for(admin_user).post(
        reverse("training:base_model_status", args=[tiny_base.pk]), {"status": "retired"}, follow=True
    )
    assert [str(m) for m in response.context["messages"]] == [
        "tiny-llama is now retired. No queued job was waiting on it."
    ]
    assert _retire_event(tiny_base).data == {"cancelled_jobs": [], "running_jobs": 0}


def test_worker_refuses_a_job_whose_base_model_was_retired_after_its_message_was_sent(
    engineer, admin_user, sft_version, tiny_base, other_base, monkeypatch
):
    """The retire's cancel missed the job (its message raced the retire): the worker that claims it
    cancels it with the reason instead of training, and takes the next queued job."""
    stale = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    TrainingJob.objects.filter(pk=stale.pk).update(priority=5)  # first in line
    nxt = jobs.create_job(smoke_request(sft_version, other_base), engineer)
    # the retire as another process committed it, without reaching this job
    BaseModel.objects.filter(pk=tiny_base.pk).update(status=BaseModel.Status.RETIRED)
    audit.record(admin_user, "base_model.retired", tiny_base)
    ran = []

    def run_claimed(job, echo=None):
        ran.append(job.pk)
        return job

    monkeypatch.setattr(jobs, "run_claimed", run_claimed)
    assert tasks.run_next() == nxt.pk
    assert ran == [nxt.pk]  # the job on the retired model never reached the trainer
    stale.refresh_from_db()
    assert stale.state == TrainingJob.State.CANCELLED
    assert stale.attempt == 0 and stale.started_at is None and stale.worker == ""
    assert stale.error_code == "base_model_retired"
    assert (
        stale.error_message
        == "Cancelled: the base model tiny-llama was retired by ada before this job started."
    )
    assert stale.error_suggestion == "Choose another base model and launch the job again."
    assert job_verbs(stale) == ["training.job.create", "training.job.cancelled"]
    assert _job_event(stale, "training.job.cancelled").data == {"reason": "base_model_retired"}
    # a second message finds nothing left to claim on it
    assert tasks.run_next() is None and ran == [nxt.pk]


def test_a_job_put_back_by_the_watchdog_after_the_retire_is_not_restarted(
    engineer, admin_user, sft_version, tiny_base, settings
):
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    jobs.claim_next("w1")
    change = jobs_retire(tiny_base, admin_user)
    assert change.cancelled_jobs == [] and change.running_jobs == 1  # running: left to finish
    old = timezone.now() - timezone.timedelta(seconds=settings.STUDIO_JOB_STALE_SECONDS + 5)
    TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=old)  # ... but its worker died
    assert jobs.requeue_stale()["requeued"] == [job.pk]
    assert jobs.claim_next("w2") is None
    job.refresh_from_db()
    assert job.state == TrainingJob.State.CANCELLED and job.attempt == 1
    assert (
        job.error_message
        == "Cancelled: the base model tiny-llama was retired by ada before this job could restart."
    )
    assert job.error_suggestion == (
        "Launch the job again on another base model, or ask an admin to reactivate tiny-llama and resume "
        "this job from its checkpoint."
    )
    assert job_verbs(job)[-1] == "training.job.cancelled"


def test_launching_on_a_retired_base_model_is_refused(
    client_for, engineer, admin_user, sft_version, tiny_base
):
    jobs_retire(tiny_base, admin_user)
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    assert exc.value.problems == ["Base model tiny-llama is retired; choose an available one."]
    # the form does not offer it, and a posted id is refused
    client = client_for(engineer)
    page = client.get(reverse("training:job_new") + "?preset=smoke")
    assert tiny_base not in page.context["form"].fields["base_model"].queryset
    data = {k: v for k, v in page.context["form"].initial.items() if v is not None and v is not False}
    data.update(dataset_version=sft_version.pk, base_model=tiny_base.pk)
    response = client.post(reverse("training:job_new"), data)
    assert response.status_code == 200 and "base_model" in response.context["form"].errors
    assert not TrainingJob.objects.exists()


def test_a_retire_committed_between_the_checks_and_the_insert_refuses_the_launch(
    engineer, admin_user, sft_version, tiny_base, monkeypatch
):
    real_preview = jobs.preview

    def preview_then_retire(request):
        outcome = real_preview(request)  # the checks pass on an available model ...
        jobs_retire(tiny_base, admin_user)  # ... then an admin retires it
        return outcome

    monkeypatch.setattr(jobs, "preview", preview_then_retire)
    with pytest.raises(jobs.JobRefused, match="Base model tiny-llama is retired; choose an available one."):
        jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    assert not TrainingJob.objects.exists()


# =====================================================================================================
# Defect 2: the token estimate uses the job's base model's tokenizer
# =====================================================================================================

OTHER_CORPUS = ["zebra quantum xylophone jukebox", "fjord whisky vex nymph"]


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    """A tiny model whose byte-level BPE learnt other words: the support texts split into more tokens."""
    return build_tiny_model(tmp_path_factory.mktemp("other-tok") / "model", corpus=OTHER_CORPUS)


@pytest.fixture
def other_tok_base(other_tokenizer_dir, admin_user):
    return register_local_dir("tiny-other-tok", Path(other_tokenizer_dir), admin_user)


@pytest.fixture
def counted_version(curator, tiny_base):
    """A version of a dataset whose base model is tiny-llama: its stored counts are tiny-llama's."""
    return make_version(curator, name="counted", base=tiny_base)


def _train_conversations(version) -> list[list[dict]]:
    return [
        ex.messages for ex in version.examples.filter(split="train").order_by("position") if ex.chosen is None
    ]


def _counts(base: BaseModel, conversations) -> list[int]:
    return tokens.count_many(tokens.load_tokenizer(base.local_dir), conversations)


def _config(**overrides) -> dict:
    config, problems = jobs.normalise_config(
        {**jobs.PRESETS["smoke"]["config"], "max_steps": None, **overrides}
    )
    assert problems == []
    return config


def _estimate(version, base, method="lora", **overrides) -> dict:
    return jobs.estimate(dataset_version=version, base_model=base, method=method, config=_config(**overrides))


def _estimate_page(client, version, base, **fields) -> str:
    page = client.get(reverse("training:job_new") + "?preset=smoke")
    data = {k: v for k, v in page.context["form"].initial.items() if v is not None and v is not False}
    data.update(dataset_version=version.pk, base_model=base.pk, **fields)
    response = client.post(reverse("training:job_estimate"), data)
    assert response.status_code == 200
    return response.content.decode()


def test_same_base_model_uses_the_stored_counts_without_tokenizing(
    client_for, engineer, counted_version, tiny_base, monkeypatch
):
    def no_counting(*args, **kwargs):
        raise AssertionError("the stored counts were made with this tokenizer: nothing to count")

    monkeypatch.setattr(tokens, "count_many", no_counting)
    figures = _estimate(counted_version, tiny_base, epochs=2)
    stored = [12 + i for i in range(8)]  # what make_version stored for the 8 train examples
    assert figures["tokens_per_epoch"] == sum(stored) and figures["tokens_total"] == 2 * sum(stored)
    assert figures["token_sources"] == [
        {"part": "train", "method": "stored", "tokenizer": "tiny-llama", "counted_with": "tiny-llama",
         "examples": 8, "sample": 0}
    ]  # fmt: skip
    assert figures["approximate"] is False
    page = _estimate_page(client_for(engineer), counted_version, tiny_base)
    assert (
        "Token figures: the counts stored with the dataset version, made with tiny-llama's tokenizer "
        "(this job's base model)." in page
    )


def test_another_base_model_counts_every_example_with_its_own_tokenizer(
    client_for, engineer, counted_version, other_tok_base
):
    conversations = _train_conversations(counted_version)
    expected = _counts(other_tok_base, conversations)
    stored = list(
        counted_version.examples.filter(split="train")
        .order_by("position")
        .values_list("token_count", flat=True)
    )
    assert sum(expected) != sum(stored)  # the two tokenizers disagree: the stored figure would be wrong
    figures = _estimate(counted_version, other_tok_base, epochs=2)
    assert figures["tokens_per_epoch"] == sum(expected)
    assert figures["tokens_total"] == 2 * sum(expected)
    assert figures["steps"] == 8  # 8 examples, batch 2, 2 epochs: steps do not depend on the tokenizer
    assert figures["token_sources"][0]["method"] == "counted"
    # the job's max length cuts each example as the job's tokenizer counts it
    cut = sorted(expected)[3]
    figures = _estimate(counted_version, other_tok_base, max_length=cut)
    assert figures["truncated_examples"] == sum(1 for n in expected if n > cut) > 0
    assert figures["tokens_per_epoch"] == sum(min(n, cut) for n in expected)

    page = _estimate_page(client_for(engineer), counted_version, other_tok_base)
    assert f"{sum(expected):,}" in page
    assert (
        "Token figures: every example counted with tiny-other-tok's tokenizer (this job's base "
        "model), not the stored counts, which tiny-llama's tokenizer made." in page
    )
    # the launched job keeps the figures it was launched with
    job = jobs.create_job(smoke_request(counted_version, other_tok_base), engineer)
    assert job.estimate["tokens_per_epoch"] == sum(min(n, 256) for n in expected)
    assert job.estimate["token_sources"][0]["tokenizer"] == "tiny-other-tok"


def test_a_large_split_is_estimated_from_a_labelled_sample(
    client_for, engineer, counted_version, other_tok_base, monkeypatch
):
    monkeypatch.setattr(jobs, "TOKEN_SAMPLE_SIZE", 4)
    tokenized = []
    real = tokens.count_many

    def count_many(tokenizer, conversations):
        tokenized.append(len(conversations))
        return real(tokenizer, conversations)

    monkeypatch.setattr(tokens, "count_many", count_many)
    exact = sum(_counts(other_tok_base, _train_conversations(counted_version)))
    tokenized.clear()
    figures = _estimate(counted_version, other_tok_base)
    assert tokenized == [4]  # only the sample was tokenized
    assert figures["examples"] == 8 and figures["approximate"] is True
    source = figures["token_sources"][0]
    assert (source["method"], source["sample"], source["examples"]) == ("sampled", 4, 8)
    assert abs(figures["tokens_per_epoch"] - exact) <= 0.15 * exact  # close to the full count
    page = _estimate_page(client_for(engineer), counted_version, other_tok_base)
    assert "estimated from a sample of 4 examples</strong> (of 8) with tiny-other-tok's tokenizer" in page
    assert "about " in page
    assert tokenized == [4]  # the page's request took the sample's counts from the cache


def test_a_version_without_counts_is_counted_with_the_jobs_tokenizer(curator, other_tok_base):
    """A dataset without a base model stores no counts (0): the estimate counts rather than show 0 tokens."""
    version = make_version(curator, name="uncounted")
    VersionExample.objects.filter(version=version).update(token_count=0)
    expected = _counts(other_tok_base, _train_conversations(version))
    figures = _estimate(version, other_tok_base)
    assert figures["tokens_per_epoch"] == sum(expected) > 0
    assert figures["token_sources"][0]["method"] == "counted"
    assert figures["token_sources"][0]["counted_with"] == ""


def test_preference_pairs_count_their_longer_side_with_the_jobs_tokenizer(curator, tiny_base, other_tok_base):
    version = make_version(curator, kind="preference", name="prefs", base=tiny_base)
    rows = version.examples.filter(split="train").order_by("position")
    expected = [
        max(
            _counts(other_tok_base, [ex.messages + [{"role": "assistant", "content": ex.chosen}]])[0],
            _counts(other_tok_base, [ex.messages + [{"role": "assistant", "content": ex.rejected}]])[0],
        )
        for ex in rows
    ]
    figures = _estimate(version, other_tok_base, method="dpo", packing=False)
    assert figures["tokens_per_epoch"] == sum(expected)


def test_replayed_examples_are_counted_with_the_jobs_tokenizer_too(curator, tiny_base, other_tok_base):
    from datasets_app.services import versions

    first = make_version(curator, name="replayed", base=tiny_base)
    changed = first.dataset.examples.order_by("position").first()
    Example.objects.filter(pk=changed.pk).update(
        tags=["again"]
    )  # a change: the same content is no new version
    second = versions.freeze(first.dataset, curator, changelog="again")
    replay = _counts(other_tok_base, _train_conversations(first))
    train = _counts(other_tok_base, _train_conversations(second))
    config = _config()
    figures = jobs.estimate(
        dataset_version=second,
        base_model=other_tok_base,
        method="lora",
        config=config,
        replay_version=first,
        replay_percent=50,
    )
    assert figures["examples"] == 8 + 4
    picks = replay_picks(8, 8, 50, config.get("seed", 42))  # the rows the worker mixes in
    assert figures["tokens_per_epoch"] == sum(train) + sum(replay[i] for i in picks)
    assert [s["part"] for s in figures["token_sources"]] == ["train", "replay"]
    assert {s["method"] for s in figures["token_sources"]} == {"counted"}


def test_an_unreadable_tokenizer_is_refused_in_plain_words(engineer, admin_user, counted_version, tmp_path):
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(build_tiny_model(tmp_path / "src"), copy)
    base = register_local_dir("no-tokenizer", copy, admin_user)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (copy / name).unlink(missing_ok=True)
    tokens.clear_tokenizer_cache()
    _config_, _name, problems, figures = jobs.preview(smoke_request(counted_version, base))
    assert figures is None
    assert problems == [
        f"Base model no-tokenizer's tokenizer could not be read from {copy}, so this job's tokens cannot "
        "be counted (and it could not train): an admin can restore the model's tokenizer files or retire "
        "the model; choose another base model meanwhile."
    ]
    with pytest.raises(jobs.JobRefused):
        jobs.create_job(smoke_request(counted_version, base), engineer)


@pytest.mark.slow
def test_the_real_smollm2_tokenizer_counts_a_dataset_counted_with_another(
    admin_user, counted_version, smollm2_dir
):
    smollm2 = register_local_dir("SmolLM2-gaps", Path(smollm2_dir), admin_user)
    expected = _counts(smollm2, _train_conversations(counted_version))
    figures = _estimate(counted_version, smollm2)
    assert figures["tokens_per_epoch"] == sum(expected) != sum(12 + i for i in range(8))
    assert figures["token_sources"][0] == {
        "part": "train", "method": "counted", "tokenizer": "SmolLM2-gaps", "counted_with": "tiny-llama",
        "examples": 8, "sample": 8,
    }  # fmt: skip
