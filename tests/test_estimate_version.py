"""The dataset version page's training estimate leaves out the examples the trainer will skip (an SFT
example whose prompt alone fills the max length; a DPO pair TRL drops), as the launch page's does, with the
same warning banners, counted with the version's own base model's tokenizer; and says in words when they
could not be checked. A DPO run whose every eval pair is skipped (evaluation every N steps off) is not
evaluated on an empty set: no eval figure is recorded, and the log says why, as for SFT.

The data builders and the real SmolLM2 tokenizer fixture are those of tests/test_estimate_skipped.py; the
training runs use the suite's tiny random Llama (a second or two each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_version, smoke_request
from django.urls import reverse
from django.utils.html import escape
from test_estimate_skipped import (
    LONG_KEPT,
    LONG_PROMPT,
    LONG_PROMPT_2,
    MAX,
    MIXED,
    OTHER,
    PAIRS,
    SHORT,
    SKIPPED_SENTENCE,
    _config,
    _estimate,
    _trainer_sft,
    _version,
    assert_sampled,
    sampled_mixed,
)
from test_estimate_skipped import smollm2 as smollm2  # noqa: F401
from test_training_jobs import _no_heartbeat_thread_writes as _no_heartbeat_thread_writes  # noqa: F401

from datasets_app.models import Example
from datasets_app.services import versions
from datasets_app.services.datasets import create_dataset
from training_app.models import BaseModel, TrainingMetric
from training_app.services import jobs, register_local_dir
from training_app.trainer import data as trainer_data
from training_app.trainer.run import NO_EVAL_LEFT

pytestmark = pytest.mark.django_db
# the tests that read the real SmolLM2's tokenizer are marked as tests/test_estimate_skipped.py's are
smollm2_tokenizer = pytest.mark.slow

UNCHECKED = "Skipped examples could not be checked"


def _page(client, version, **fields):
    """The version page with the estimate form filled in (the smoke preset's batch, no accumulation)."""
    query = {"epochs": 1, "batch_size": 2, "grad_accum": 1, "max_length": MAX, **fields}
    response = client.get(reverse("datasets:version", args=[version.pk]), query)
    assert response.status_code == 200
    return response.context["estimate"], response.content.decode()


@smollm2_tokenizer
def test_the_version_page_leaves_out_the_examples_the_trainer_skips(client_for, curator, smollm2):
    version = _version(curator, smollm2, MIXED)
    kept, dropped = _trainer_sft(version, smollm2)
    assert (len(kept), dropped) == (3, 2)
    launch = _estimate(version, smollm2)  # the launch page's figures for the same settings
    config = _config()
    assert (config["batch_size"], config["grad_accum"], config["epochs"]) == (2, 1, 1.0)

    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == launch["examples"] == len(kept) == 3
    assert estimate["tokens_per_epoch"] == launch["tokens_per_epoch"] == trainer_data.count_tokens(kept)
    assert estimate["steps_per_epoch"] == estimate["steps_total"] == launch["steps"] == 2  # 5 examples: 3
    assert estimate["truncated_examples"] == launch["truncated_examples"] == 1
    assert estimate["skipped"] == launch["skipped"]
    assert SKIPPED_SENTENCE in page  # the launch page's banner, word for word
    assert 'data-skipped="2"' in page
    assert "<dt>Examples</dt><dd>3</dd>" in page
    assert "<dt>Steps in all</dt><dd><strong>2</strong></dd>" in page
    assert UNCHECKED not in page and "eval examples would be skipped" not in page

    # a max length that holds every prompt skips none
    estimate, page = _page(client_for(curator), version, max_length=256)
    assert estimate["examples"] == 5 and "would be skipped" not in page


@smollm2_tokenizer
def test_the_version_page_leaves_out_the_preference_pairs_trl_drops(client_for, curator, smollm2):
    version = _version(curator, smollm2, PAIRS, kind="preference", name="prefs")
    launch = _estimate(version, smollm2, method="dpo", packing=False)
    assert (
        launch["examples"] == 2 and launch["skipped"]["examples"] == 2
    )  # TRL keeps 2 (test_estimate_skipped)

    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == 2
    assert estimate["tokens_per_epoch"] == launch["tokens_per_epoch"]
    assert estimate["steps_total"] == launch["steps"] == 1
    assert (
        "2 of 4 train examples would be skipped: their prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten them." in page
    )


@smollm2_tokenizer
def test_the_version_page_names_the_eval_examples_the_trainer_skips(client_for, curator, smollm2):
    version = _version(curator, smollm2, [SHORT, OTHER, LONG_KEPT], eval_items=[SHORT, LONG_PROMPT])
    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == 3 and estimate["skipped"]["examples"] == 0
    assert estimate["eval_skipped"]["examples"] == 1 and estimate["eval_skipped"]["of"] == 2
    assert (
        "1 of 2 eval examples would be skipped: its prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten it." in page
    )
    assert "train examples would be skipped" not in page


def test_a_version_without_a_base_model_says_skipped_examples_could_not_be_checked(client_for, curator):
    dataset = create_dataset("no-base", "sft", curator)
    for position, messages in enumerate([SHORT, LONG_PROMPT, LONG_PROMPT_2]):
        Example.objects.create(
            dataset=dataset, position=position, messages=messages, split="train",
            content_hash=f"{position:064d}", token_count=0, pii_status=Example.Pii.CLEAN,
        )  # fmt: skip
    version = versions.freeze(dataset, curator, changelog="test data")
    assert version.base_model_id is None
    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == 3 and estimate["steps_total"] == 2  # nothing left out: not checked
    assert (
        "Skipped examples could not be checked: this version was frozen without a base model, so there is no "
        "tokenizer to check them with." in page
    )
    assert "would be skipped" not in page


@smollm2_tokenizer
def test_a_base_model_whose_files_are_missing_is_named_and_the_page_still_answers(
    client_for, curator, smollm2
):
    version = _version(curator, smollm2, MIXED)
    BaseModel.objects.filter(pk=smollm2.pk).update(path="/nonexistent/smollm2-gone")
    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == 5 and estimate["skipped"] is None  # every stored count, as before
    said = (
        "Skipped examples could not be checked: base model SmolLM2-skips's tokenizer files could not be read"
    )
    assert estimate["skipped_unchecked"].startswith(said) and escape(said) in page
    assert "Traceback" not in page and "/nonexistent" not in page


@smollm2_tokenizer
def test_an_example_the_trainer_would_refuse_is_named_and_the_page_still_answers(
    client_for, curator, smollm2, monkeypatch
):
    version = _version(curator, smollm2, MIXED)
    refusal = (
        "Base model SmolLM2-skips's chat template refuses example 4 of this dataset version, so the job "
        "could not train on it either."
    )

    def refuses(*args, **kwargs):  # what _measure_skipped raises when the chat template refuses a row
        raise jobs.JobRefused(refusal)

    monkeypatch.setattr(jobs, "_measure_skipped", refuses)
    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == 5 and estimate["skipped"] is None
    assert estimate["skipped_unchecked"] == f"{UNCHECKED}: {refusal}" and escape(refusal) in page


@smollm2_tokenizer
def test_no_example_as_long_as_the_max_length_needs_no_tokenizer(client_for, curator, smollm2, monkeypatch):
    version = _version(curator, smollm2, [SHORT, OTHER])
    BaseModel.objects.filter(pk=smollm2.pk).update(path="/nonexistent/smollm2-gone")

    def no_measuring(*args, **kwargs):
        raise AssertionError("no example reaches the max length: nothing to tokenise")

    monkeypatch.setattr(jobs, "_measure_skipped", no_measuring)
    estimate, page = _page(client_for(curator), version)
    assert estimate["examples"] == 2 and estimate["skipped"]["examples"] == 0
    assert UNCHECKED not in page and "would be skipped" not in page


@smollm2_tokenizer
def test_many_long_examples_are_measured_on_a_sample_on_the_version_page(
    client_for, curator, smollm2, monkeypatch
):
    version, measured = sampled_mixed(curator, smollm2, monkeypatch)
    estimate, page = _page(client_for(curator), version)
    assert_sampled(version, measured)
    assert estimate["skipped"]["approximate"] is True and estimate["examples"] == 3
    assert "about " + SKIPPED_SENTENCE in page
    assert "<dt>Examples</dt><dd>about 3</dd>" in page
    _page(client_for(curator), version)
    assert len(measured) == 2  # the second request took the measurement from the cache


# --- a run whose every eval example is skipped, evaluation every N steps off -----------------------------

EVAL_LONG = " ".join(["the customer asked where the parcel is and the agent said it ships tomorrow"] * 6)


@pytest.fixture
def tiny_base(tiny_model_dir, admin_user):
    return register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)


def _with_long_eval(user, kind):
    """2 short train examples (make_version's) and 2 eval examples whose prompt alone fills 64 tokens."""
    version = make_version(user, kind=kind, name=f"long-eval-{kind}", train=2, eval_=0)
    dataset = version.dataset
    for position in (2, 3):
        fields = {"chosen": "it ships tomorrow", "rejected": "no idea"} if kind == "preference" else {}
        messages = [{"role": "user", "content": f"{EVAL_LONG} {position}"}]
        if kind != "preference":
            messages.append({"role": "assistant", "content": "it ships tomorrow"})
        Example.objects.create(
            dataset=dataset, position=position, messages=messages, split="eval",
            content_hash=f"{position:064d}", token_count=400, pii_status=Example.Pii.CLEAN, **fields,
        )  # fmt: skip
    return versions.freeze(dataset, user, changelog="long eval prompts")


def _run(version, base, engineer, method):
    request = smoke_request(version, base, max_steps=1, max_length=MAX, eval_every=0, checkpoint_every=50)
    request.method = method
    job = jobs.create_job(request, engineer)
    return jobs.run_claimed(jobs.claim(job.pk, "test"))


def _eval_figures(job) -> dict:
    names = set(TrainingMetric.objects.filter(job=job).values_list("name", flat=True))
    return {
        "rows": sorted(n for n in names if n.startswith("eval")),
        "final": sorted(k for k in job.final_metrics if k.startswith("eval")),
    }


def test_a_dpo_run_with_every_eval_pair_skipped_records_no_eval_figures(
    client_for, engineer, curator, tiny_base
):
    version = _with_long_eval(curator, "preference")
    job = _run(version, tiny_base, engineer, "dpo")
    assert job.state == "succeeded", (job.error_code, job.error_message)
    assert _eval_figures(job) == {"rows": [], "final": []}  # not those of an empty set (eval_runtime …)
    log = "\n".join(job.log_tail)
    assert "2 of 2 eval pairs skipped: prompt longer than the max length" in log
    assert NO_EVAL_LEFT in log
    page = client_for(engineer).get(reverse("training:job", args=[job.pk])).content.decode()
    assert NO_EVAL_LEFT in page


def test_an_sft_run_with_every_eval_example_skipped_says_so_the_same_way(engineer, curator, tiny_base):
    version = _with_long_eval(curator, "sft")
    job = _run(version, tiny_base, engineer, "lora")
    assert job.state == "succeeded", (job.error_code, job.error_message)
    assert _eval_figures(job) == {"rows": [], "final": []}
    log = "\n".join(job.log_tail)
    assert "2 of 2 eval rows skipped: no assistant tokens within max length" in log
    assert NO_EVAL_LEFT in log
