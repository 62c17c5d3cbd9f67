"""Review 9: defects found in this session's changes, each reproduced by a test that failed first.

1. The pre-launch estimate now renders every example with the job's base model's chat template. A
   template that refuses a conversation (Gemma's "System role not supported", Mistral's "roles must
   alternate") raised out of the estimate: the job form answered 500 instead of saying which base model
   cannot train on this version.
2. The approval form's new hidden `evidence_seen` field (and the version page's hidden `eval_run`) were
   turned into ints with `int()` after an `isdigit()` check only: a value of more than 4,300 digits
   raised ValueError, a 500 instead of a plain refusal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_CHATML, build_tiny_model, make_version, smoke_request
from django.urls import reverse
from test_gate import world as world  # noqa: F401 - the fixture
from test_training_jobs import tiny_base as tiny_base  # noqa: F401 - the fixture

from datasets_app import tokens
from datasets_app.models import VersionExample
from eval_app.models import Alias, PromotionRequest
from eval_app.services import gate
from training_app.models import TrainingJob
from training_app.services import jobs, register_local_dir

pytestmark = pytest.mark.django_db

# =====================================================================================================
# 1. A chat template that refuses the version's conversations
# =====================================================================================================

NO_SYSTEM = (  # as Gemma's template: a conversation that starts with a system message is refused
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + TINY_CHATML
)
SYSTEM_PROMPT = "Answer as Jolanda Vries of the Utrecht branch."  # message text: never in a page or log


@pytest.fixture(scope="module")
def no_system_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("no-system") / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = NO_SYSTEM
    tokenizer.save_pretrained(str(path))
    tokens.clear_tokenizer_cache()
    return path


@pytest.fixture
def no_system_base(no_system_dir, admin_user):
    return register_local_dir("no-system-llm", Path(no_system_dir), admin_user)


@pytest.fixture
def version_with_system(curator, tiny_base):
    """Counted with tiny-llama (which accepts a system message); its third train example has one."""
    version = make_version(curator, name="with-system", base=tiny_base)
    example = version.examples.filter(split="train").order_by("position")[2]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *example.messages]
    VersionExample.objects.filter(pk=example.pk).update(messages=messages)
    return version


def _form_data(client, version, base) -> dict:
    page = client.get(reverse("training:job_new") + "?preset=smoke")
    data = {k: v for k, v in page.context["form"].initial.items() if v is not None and v is not False}
    data.update(dataset_version=version.pk, base_model=base.pk)
    return data


def test_a_chat_template_that_refuses_an_example_is_a_plain_problem_not_a_500(
    client_for, engineer, version_with_system, no_system_base, caplog
):
    _config, _name, problems, figures = jobs.preview(smoke_request(version_with_system, no_system_base))
    assert figures is None
    assert len(problems) == 1
    problem = problems[0]
    assert "no-system-llm's chat template refuses example 3 of this dataset version" in problem
    assert "System role not supported" in problem  # the template's own words
    assert SYSTEM_PROMPT not in problem

    client = client_for(engineer, raise_request_exception=False)
    data = _form_data(client, version_with_system, no_system_base)
    estimate = client.post(reverse("training:job_estimate"), data)
    assert estimate.status_code == 200
    assert "no-system-llm&#x27;s chat template refuses example 3" in estimate.content.decode()

    launch = client.post(reverse("training:job_new"), data)
    assert launch.status_code == 200  # the form again, with the reason; no job
    assert "chat template refuses example 3" in launch.content.decode()
    assert not TrainingJob.objects.exists()
    assert SYSTEM_PROMPT not in caplog.text


def test_the_same_version_on_a_base_model_whose_template_accepts_it_still_estimates(
    engineer, version_with_system, tiny_base
):
    _config, _name, problems, figures = jobs.preview(smoke_request(version_with_system, tiny_base))
    assert problems == [] and figures["examples"] == 8


# =====================================================================================================
# 2. Run numbers of thousands of digits in the gate's forms
# =====================================================================================================

HUGE = "9" * 5000  # int() refuses more than 4,300 digits


def test_an_approval_with_a_garbled_evidence_run_is_refused_in_plain_words(world, client_for):
    v = world.version()
    world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    admin = client_for(world.approver, raise_request_exception=False)
    url = reverse("eval:promotion_approve", args=[req.pk])
    for garbled in (HUGE, "9" * 20, "-3", "run 4"):
        response = admin.post(url, {"evidence_seen": garbled}, follow=True)
        assert response.status_code == 200, garbled[:20]
        page = response.content.decode()
        assert "The decision form did not say which evaluation run it showed" in page, garbled[:20]
        req.refresh_from_db()
        assert req.status == PromotionRequest.Status.PENDING and not Alias.objects.exists()
    # the page's own value still approves
    page = admin.get(reverse("eval:promotion", args=[req.pk])).content.decode()
    seen = page.split('name="evidence_seen" value="', 1)[1].split('"', 1)[0]
    assert admin.post(url, {"evidence_seen": seen}).status_code == 302
    req.refresh_from_db()
    assert req.status == PromotionRequest.Status.APPROVED


def test_a_request_naming_a_run_of_thousands_of_digits_is_refused_in_plain_words(world, client_for):
    v = world.version()
    world.good_run(v)
    engineer = client_for(world.requester, raise_request_exception=False)
    url = reverse("eval:promotion_request", args=[v.pk])
    response = engineer.post(url, {"alias": "production", "eval_run": HUGE}, follow=True)
    assert response.status_code == 200
    assert "That evaluation run is not a run of this version" in response.content.decode()
    assert not PromotionRequest.objects.exists()


# =====================================================================================================
# 3. The audit page's checkpoint: a page load racing a whole check
# =====================================================================================================


def test_a_page_load_racing_the_whole_check_does_not_clear_the_break_it_found(admin_user, client_for):
    """A page load reads the checkpoint and walks the few newer events; meanwhile another admin's "Check
    the whole chain" finds an edited older event and marks the checkpoint broken. The page load's save
    used to overwrite that mark, so later loads showed "Chain intact" again over a tampered log."""
    from unittest import mock

    from studio import audit
    from studio.models import AuditCheckpoint, AuditEvent

    events = [audit.record(admin_user, f"step.{i}", None, n=i) for i in range(5)]
    client = client_for(admin_user)
    client.get(reverse("audit"))  # checkpoint at the 5th event
    AuditEvent.objects.filter(pk=events[1].pk).update(data={"n": 99})  # an edit before the checkpoint
    audit.record(admin_user, "step.new", None)  # something newer for the next page load
    real_walk = audit.verify_chain

    def walk_while_a_whole_check_runs(*args, **kwargs):
        report = real_walk(*args, **kwargs)
        if kwargs.get("after_id") is not None:  # the page load, between its read and its save
            whole, _full_at = audit.verify_from_checkpoint(full=True)
            assert whole.broken_at == events[1].pk
        return report

    with mock.patch.object(audit, "verify_chain", side_effect=walk_while_a_whole_check_runs):
        client.get(reverse("audit"))
    assert AuditCheckpoint.objects.get().broken
    page = client.get(reverse("audit")).content.decode()
    link = f'<a href="{reverse("audit_event", args=[events[1].pk])}">#{events[1].pk}</a>'
    assert f"Chain broken at event {link}" in page and "Chain intact" not in page


# =====================================================================================================
# 4. The importer counts tokens with the same chat templates: a refused conversation is a rejected line
# =====================================================================================================


def test_an_import_rejects_the_lines_a_chat_template_refuses_and_keeps_the_rest(
    curator, no_system_base, tmp_path, caplog
):
    import json

    from datasets_app.models import Example, Upload
    from datasets_app.services import datasets, imports

    chat = [
        {"role": "user", "content": "Where is order ORD-77?"},
        {"role": "assistant", "content": "Shipped."},
    ]
    rows = [
        {"messages": chat},
        {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, *chat]},
        {"messages": chat},
    ]
    path = tmp_path / "system.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ds = datasets.create_dataset("Gemma-like", "sft", curator, base_model=no_system_base)
    result = imports.process(imports.receive_path(ds, curator, path).pk)
    assert (result.imported, result.rejected) == (2, 1)
    (rejection,) = result.rejections
    assert rejection["line"] == 2 and rejection["code"] == "template_refused"
    assert "no-system-llm's chat template refuses this conversation" in rejection["reason"]
    assert '(it says: "System role not supported")' in rejection["reason"]
    assert SYSTEM_PROMPT not in rejection["reason"] and SYSTEM_PROMPT not in caplog.text
    assert list(Example.objects.filter(dataset=ds).values_list("source_line", flat=True)) == [1, 3]
    assert all(n > 0 for n in Example.objects.filter(dataset=ds).values_list("token_count", flat=True))
    assert Upload.objects.get(pk=result.upload.pk).report["counts"] == {"template_refused": 1}


# =====================================================================================================
# 5. The upload watchdog never requeues an upload a redelivered task claimed again meanwhile
# =====================================================================================================


@pytest.mark.parametrize("attempts", [1, 3], ids=["requeue", "give-up"])
def test_the_watchdog_leaves_an_upload_claimed_again_after_its_listing(
    curator, tmp_path, monkeypatch, attempts
):
    from datetime import timedelta

    from django.utils import timezone

    from datasets_app.models import Upload
    from datasets_app.services import datasets, imports, progress

    ds = datasets.create_dataset("Watched", "sft", curator)
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
    )
    upload = imports.receive_path(ds, curator, path)
    stale = timezone.now() - imports.STALE_AFTER - timedelta(minutes=1)
    Upload.objects.filter(pk=upload.pk).update(
        status=Upload.Status.PROCESSING, started_at=stale, attempts=attempts
    )

    def claimed_again_meanwhile(kind, pk):  # between the watchdog's listing and its UPDATE
        Upload.objects.filter(pk=pk).update(started_at=timezone.now(), attempts=attempts + 1)
        return None

    monkeypatch.setattr(progress, "get_progress", claimed_again_meanwhile)
    assert imports.requeue_stale() == []
    upload.refresh_from_db()
    assert (upload.status, upload.attempts, upload.error) == (Upload.Status.PROCESSING, attempts + 1, "")
    assert upload.raw_path  # the running attempt keeps its file


# =====================================================================================================
# 6. Tags are scanned like the text: an edit of the tags alone is scanned again
# =====================================================================================================


def test_editing_only_the_tags_rescans_them_and_drops_findings_on_the_old_tags(
    curator, tmp_path, django_capture_on_commit_callbacks
):
    from test_datasets import import_file, write_jsonl

    from datasets_app.models import Example, PiiFinding
    from datasets_app.services import datasets, scrub

    ds = datasets.create_dataset("Tagged", "sft", curator)
    chat = [
        {"role": "user", "content": "Is order ORD-5512 shipped?"},
        {"role": "assistant", "content": "Yes."},
    ]
    import_file(
        ds, write_jsonl(tmp_path / "t.jsonl", [{"messages": chat, "tags": ["caller Maria Gonzalez"]}])
    )
    scrub.scan_examples(ds)
    example = Example.objects.get(dataset=ds)
    old = list(PiiFinding.objects.filter(example=example).values_list("entity_type", flat=True))
    assert "PERSON" in old  # the name in the old tag

    with django_capture_on_commit_callbacks() as callbacks:  # the scan task is sent on commit
        datasets.edit_example(
            example,
            messages=example.messages,
            tags=["billing", "write to jane.roe@example.com"],
            user=curator,
        )
    example.refresh_from_db()
    assert example.pii_status == Example.Pii.UNSCANNED and example.edited
    assert not PiiFinding.objects.filter(example=example).exists()  # offsets into tags that are gone
    assert len(callbacks) >= 1
    scrub.scan_examples(ds, [example.pk])
    found = set(PiiFinding.objects.filter(example=example).values_list("entity_type", flat=True))
    assert "EMAIL_ADDRESS" in found and "PERSON" not in found
    # the same tags again: nothing to scan
    datasets.edit_example(example, messages=example.messages, tags=list(example.tags), user=curator)
    example.refresh_from_db()
    assert example.pii_status == Example.Pii.PENDING
