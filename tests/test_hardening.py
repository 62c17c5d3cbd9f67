"""Bad input and edge cases a review of the whole studio turned up: each one used to end in a 500, a
bypass or wrong data. Every test here failed before its fix."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse
from test_datasets import GOOD, import_file, scanned, write_jsonl

from datasets_app.models import DuplicateGroup, Example, PiiFinding, Upload
from datasets_app.services import datasets, duplicates, versions
from eval_app.services import serving
from studio.forms import UserCreateForm, UserEditForm
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db


# --- uploads and sign-in ------------------------------------------------------------------------------


def test_upload_far_over_the_limit_gets_the_message_not_a_500(curator, client_for, settings):
    """Content-Length far above the limit is refused before the body is read, with CSRF enforced as in
    a browser (the CSRF middleware reads the form first)."""
    settings.STUDIO_UPLOAD_MAX_BYTES = 1024
    dataset = datasets.create_dataset("Small", "sft", curator)
    client = client_for(curator, enforce_csrf_checks=True)
    url = reverse("datasets:upload_new", args=[dataset.pk])
    client.get(url)
    token = client.cookies["csrftoken"].value
    big = SimpleUploadedFile("big.jsonl", b"x" * 225_000)
    response = client.post(url, {"csrfmiddlewaretoken": token, "file": big})
    assert response.status_code == 200
    assert "The file is larger than the upload limit of 1.0\xa0KB" in response.content.decode()
    assert Upload.objects.count() == 0


def test_look_alike_usernames_share_one_sign_in_counter(settings, curator, client_for, user_password):
    settings.STUDIO_LOGIN_MAX_ATTEMPTS = 3
    settings.STUDIO_LOGIN_WINDOW_SECONDS = 300
    for n in range(3):
        client_for(None).post(
            reverse("login"), {"username": "carla", "password": "wrong"}, REMOTE_ADDR=f"10.1.0.{n}"
        )
    # "ｃａｒｌａ" (full-width) signs in as carla once NFKC-normalised: it must be locked out too
    response = client_for(None).post(
        reverse("login"), {"username": "ｃａｒｌａ", "password": user_password}, REMOTE_ADDR="10.1.1.1"
    )
    assert response.status_code == 429


def test_new_username_is_compared_after_normalisation(admin_user):
    form = UserCreateForm(
        data={
            "username": "ＡＤＡ",
            "password1": "a-Long-unusual-passphrase-42",
            "password2": "a-Long-unusual-passphrase-42",
            "roles": ["curator"],
        }
    )
    assert not form.is_valid()
    assert "already exists" in str(form.errors["username"])


def test_two_admins_cannot_remove_each_other_and_leave_none(make_user):
    ada, erin = make_user("ada2", "admin"), make_user("erin2", "admin")
    # both forms are validated before either is saved, as with two requests at the same moment
    first = UserEditForm(data={"email": erin.email, "roles": ["engineer"]}, instance=erin, actor=ada)
    second = UserEditForm(data={"email": ada.email, "roles": ["engineer"]}, instance=ada, actor=erin)
    assert first.is_valid() and second.is_valid()
    first.save()
    with pytest.raises(Exception, match="without an active admin"):
        second.save()
    ada.refresh_from_db()
    assert ada.groups.filter(name="admin").exists()


# --- ids and request bodies ----------------------------------------------------------------------------


def test_non_ascii_digits_in_ids_are_ignored_not_a_500(reviewer, engineer, curator, client_for, tmp_path):
    assert client_for(reviewer).post(reverse("eval:review_next"), {"run": "²"}).status_code == 302
    assert client_for(engineer).get(reverse("eval:run_new") + "?version=²").status_code == 200
    dataset = datasets.create_dataset("Digits", "sft", curator)
    response = client_for(curator).post(
        reverse("datasets:pii_decide", args=[dataset.pk]), {"finding": "²", "action": "accept"}
    )
    assert response.status_code == 302


def test_api_refuses_deeply_nested_and_oversized_bodies(client_for, engineer, settings):
    _key, raw = serving.create_key(engineer, "tests")
    api = client_for(None)
    api.defaults["HTTP_AUTHORIZATION"] = f"Bearer {raw}"
    nested = api.post("/v1/chat/completions", "[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert nested.status_code == 400 and nested.json()["error"]["code"] == "invalid_json"
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "y" * 5000}]})
    big = api.post("/v1/chat/completions", body, content_type="application/json")
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


# --- datasets -------------------------------------------------------------------------------------------


def _settings_data(client, dataset) -> dict:
    form = client.get(reverse("datasets:settings", args=[dataset.pk])).context["form"]
    return {name: form[name].value() for name in form.fields if form[name].value() is not None}


def test_settings_refuse_impossible_regexes_and_let_a_custom_recognizer_go(curator, client_for):
    dataset = datasets.create_dataset("Policy", "sft", curator)
    client = client_for(curator)
    url = reverse("datasets:settings", args=[dataset.pk])
    for pattern in ("a{99999999999999}", "(" * 2000 + ")" * 2000):
        data = {**_settings_data(client, dataset), "keep_patterns": pattern}
        response = client.post(url, data)
        assert response.status_code == 200 and "invalid regex" in response.content.decode()
    data = {**_settings_data(client, dataset), "custom_recognizers": r"EMPLOYEE_ID: EMP-\d{6}"}
    assert client.post(url, data).status_code == 302
    dataset.refresh_from_db()
    assert "EMPLOYEE_ID" in json.dumps(dataset.pii_policy)
    data = {**_settings_data(client, dataset), "custom_recognizers": ""}  # op_EMPLOYEE_ID still posted
    assert "op_EMPLOYEE_ID" in data
    assert client.post(url, data).status_code == 302
    dataset.refresh_from_db()
    assert "EMPLOYEE_ID" not in json.dumps(dataset.pii_policy)


def test_split_shares_above_100_are_refused(curator, client_for, tmp_path):
    dataset = datasets.create_dataset("Split", "sft", curator)
    import_file(dataset, write_jsonl(tmp_path / "f.jsonl", GOOD))
    response = client_for(curator).post(
        reverse("datasets:split", args=[dataset.pk]),
        {"train": "1e308", "eval": "1e308", "golden": "1e308", "seed": "1"},
        follow=True,
    )
    assert response.status_code == 200
    assert set(Example.objects.values_list("split", flat=True)) == {"train"}


def test_a_new_copy_of_a_decided_example_forms_a_new_group(curator, tmp_path):
    dataset = datasets.create_dataset("Dups", "sft", curator)
    a, b = GOOD[2], GOOD[0]
    import_file(dataset, write_jsonl(tmp_path / "1.jsonl", [a, a, b]))
    assert duplicates.recompute(dataset) == 1
    duplicates.decide(DuplicateGroup.objects.get(), "keep_one", curator)
    assert duplicates.recompute(dataset) == 0  # nothing new: the decided group stays as it was
    import_file(dataset, write_jsonl(tmp_path / "2.jsonl", [a]))
    assert duplicates.recompute(dataset) == 1
    pending = DuplicateGroup.objects.get(decision="pending")
    assert [m.position for m in pending.members.order_by("position")] == [0, 3]
    duplicates.decide(pending, "keep_one", curator)
    active = list(Example.objects.filter(dataset=dataset, dropped=False).values_list("position", flat=True))
    assert active == [0, 2]


def test_keep_one_keeps_a_member_the_curator_left_active_and_audits_what_changed(curator, tmp_path):
    dataset = datasets.create_dataset("Dups2", "sft", curator)
    a = GOOD[2]
    import_file(dataset, write_jsonl(tmp_path / "1.jsonl", [a, a, a]))
    duplicates.recompute(dataset)
    group = DuplicateGroup.objects.get()
    first, second, third = group.members.order_by("position")
    Example.objects.filter(pk=first.pk).update(dropped=True)  # dropped by hand
    duplicates.decide(group, "keep_one", curator)
    assert list(Example.objects.filter(dropped=False).values_list("pk", flat=True)) == [second.pk]
    event = AuditEvent.objects.filter(verb="duplicates.keep_one").get()
    assert event.data["dropped"] == [third.pk] and event.data["restored"] == []
    duplicates.decide(group, "keep_all", curator)  # an explicit keep all brings every member back
    event = AuditEvent.objects.filter(verb="duplicates.keep_all").get()
    assert sorted(event.data["restored"]) == [first.pk, third.pk]


def test_htmx_finding_reply_stays_inside_its_dataset_and_next_is_ignored(curator, client_for, tmp_path):
    one = scanned(datasets.create_dataset("One", "sft", curator), tmp_path)
    other = datasets.create_dataset("Other", "sft", curator)
    finding = PiiFinding.objects.filter(dataset=one, decision="pending").first()
    client = client_for(curator)
    response = client.post(
        reverse("datasets:pii_decide", args=[other.pk]),
        {"finding": finding.pk, "action": "reject"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200 and response.content == b""
    finding.refresh_from_db()
    assert finding.decision == "pending"
    response = client.post(
        reverse("datasets:pii_decide", args=[one.pk]),
        {"finding": finding.pk, "action": "reject", "next": "https://evil.example/phish"},
    )
    assert response.status_code == 302 and response.url == reverse("datasets:pii", args=[one.pk])


def test_overview_counts_findings_only_in_active_examples(curator, client_for, tmp_path):
    dataset = scanned(datasets.create_dataset("Counts", "sft", curator), tmp_path)
    pending = PiiFinding.objects.filter(dataset=dataset, decision="pending")
    assert pending.exists()
    Example.objects.filter(pk__in=pending.values("example_id")).update(dropped=True)
    page = client_for(curator).get(reverse("datasets:detail", args=[dataset.pk]))
    assert page.context["overview"]["pending_findings"] == 0
    assert versions.blockers(dataset) == []


def test_export_to_a_missing_folder_is_a_clear_error(curator, tmp_path):
    dataset = scanned(datasets.create_dataset("Export", "sft", curator), tmp_path, rows=GOOD[2:])
    version = versions.freeze(dataset, curator, "first")
    with pytest.raises(CommandError, match="does not exist"):
        call_command("export_dataset", str(version.pk), "--out", str(tmp_path / "nodir" / "x.jsonl"))
    out = StringIO()
    call_command(
        "export_dataset", str(version.pk), "--out", str(tmp_path / "x.jsonl"), stdout=out, stderr=StringIO()
    )
    assert (tmp_path / "x.jsonl").is_file()


def test_tag_filter_matches_whole_tags_only(curator, client_for, tmp_path):
    import importlib

    from django.apps import apps

    dataset = datasets.create_dataset("Tags", "sft", curator)
    rows = [{**GOOD[2], "tags": ["billing", "refund"]}, {**GOOD[0], "tags": ["billing|refund"]}]
    import_file(dataset, write_jsonl(tmp_path / "t.jsonl", rows))
    client = client_for(curator)
    url = reverse("datasets:examples", args=[dataset.pk])

    def positions(tag):
        return [e.position for e in client.get(url, {"tag": tag}).context["page"]]

    assert positions("billing|refund") == [1]
    assert positions("billing") == [0] and positions("refund") == [0]
    # rows written before the change (a bare "|" inside the tag) are rewritten by the migration
    Example.objects.filter(position=1).update(tags_text="|billing|refund|")
    migration = importlib.import_module("datasets_app.migrations.0003_tags_text_bar")
    migration.rewrite(apps, None)
    assert positions("billing|refund") == [1]
    assert Example.objects.get(position=0).tags_text == "|billing|refund|"


# --- no raw personal data left in dropped examples or in SQLite's write-ahead log --------------------------

CANARY = "dup.canary.7f3a@example.com"


def _canary_rows(n=2):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Write to {CANARY} about my parcel."},
                {"role": "assistant", "content": "Done."},
            ]
        }
    ] * n + [GOOD[2]]


def _texts(dataset) -> str:
    return json.dumps(list(Example.objects.filter(dataset=dataset).values_list("messages", flat=True)))


def test_dropped_duplicates_are_scanned_and_scrubbed_without_review(curator, tmp_path):
    from datasets_app.tasks import analyse_dataset

    dataset = datasets.create_dataset("Dropped", "sft", curator)
    import_file(dataset, write_jsonl(tmp_path / "d.jsonl", _canary_rows()))
    analyse_dataset(dataset.pk)
    duplicates.decide_all(dataset, "keep_one", curator)
    dropped = Example.objects.get(dataset=dataset, dropped=True)
    assert CANARY not in json.dumps(dropped.messages) and dropped.pii_status == "reviewed"
    # the kept copy is reviewed by the curator as usual; then nothing raw is left anywhere
    kept = PiiFinding.objects.filter(dataset=dataset, decision="pending")
    assert {f.example.dropped for f in kept} == {False}
    from datasets_app.services import scrub

    scrub.decide(dataset, list(kept.values_list("pk", flat=True)), True, curator)
    assert CANARY not in _texts(dataset)
    versions.freeze(dataset, curator, "clean")


def test_an_example_dropped_before_or_after_its_scan_keeps_no_raw_text(curator, client_for, tmp_path):
    from datasets_app.services import scrub

    dataset = datasets.create_dataset("Dropped2", "sft", curator)
    import_file(dataset, write_jsonl(tmp_path / "d.jsonl", _canary_rows(1) + [GOOD[1]]))
    first = Example.objects.get(dataset=dataset, position=0)
    Example.objects.filter(pk=first.pk).update(dropped=True)  # dropped before the scan
    assert "have not been scanned" in " ".join(versions.blockers(dataset))
    scrub.scan_examples(dataset)
    first.refresh_from_db()
    assert CANARY not in json.dumps(first.messages)
    email = Example.objects.get(dataset=dataset, position=2)  # scanned, then dropped by hand
    assert PiiFinding.objects.filter(example=email, decision="pending").exists()
    client_for(curator).post(reverse("datasets:example_drop", args=[email.pk]), {"drop": "1"})
    assert not PiiFinding.objects.filter(example=email, decision="pending").exists()
    assert "maria.gonzalez@example.com" not in _texts(dataset)


@pytest.mark.django_db(transaction=True)
def test_a_failed_import_leaves_no_row_text_in_the_sqlite_wal(curator, tmp_path, monkeypatch, settings):
    from django.db import connection

    from datasets_app.services import imports

    if connection.vendor != "sqlite":
        pytest.skip("the write-ahead log is SQLite's")
    dataset = datasets.create_dataset("Wal", "sft", curator)
    rows = [{"messages": [{"role": "user", "content": f"{CANARY} {i} " + "x" * 200}, GOOD[2]["messages"][-1]]}
            for i in range(20_000)]  # fmt: skip
    path = write_jsonl(tmp_path / "w.jsonl", rows)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(imports.audit, "record", broken)
    upload = imports.receive_path(dataset, None, path)
    with pytest.raises(RuntimeError):
        imports.process(upload.pk)
    assert not Example.objects.filter(dataset=dataset).exists()
    wal = settings.DATABASES["default"]["TEST"]["NAME"] + "-wal"
    with open(wal, "rb") as fh:
        assert CANARY.encode() not in fh.read()


def test_rejection_reasons_that_quote_the_file_are_stored_encrypted(curator, client_for, tmp_path):
    """A reason may quote the line (an unknown role, a key, a value): the database keeps it sealed
    (encrypted like the upload), the upload page and the command line still show it in full."""
    canary = "canary-role-7f3a@example.com"
    dataset = datasets.create_dataset("Reasons", "sft", curator)
    bad = json.dumps({"messages": [{"role": canary, "content": "x"}, {"role": "assistant", "content": "y"}]})
    result = import_file(dataset, write_jsonl(tmp_path / "r.jsonl", GOOD[2:], [bad]))
    upload = result.upload
    upload.refresh_from_db()
    assert canary not in json.dumps(upload.report) + upload.error + upload.sealed
    assert canary in upload.first_rejections()[0]["reason"]
    page = client_for(curator).get(upload.get_absolute_url()).content.decode()
    assert canary in page
    # a whole-file refusal quoting the file's keys
    keys = tmp_path / "k.jsonl"
    keys.write_text(json.dumps({"Zxqvbnm Canarysson": 1, canary: 2}) + "\n")
    refused = import_file(datasets.create_dataset("Keys", "sft", curator), keys).upload
    refused.refresh_from_db()
    assert refused.status == "rejected"
    assert canary not in json.dumps(refused.report) + refused.error + refused.sealed
    assert canary in refused.error_text
    assert canary in client_for(curator).get(refused.get_absolute_url()).content.decode()


def test_tags_are_scanned_and_scrubbed_like_the_messages(curator, client_for, tmp_path):
    from datasets_app.services import scrub

    tag = "zq.tag.canary@example.com"
    dataset = datasets.create_dataset("TagsPii", "sft", curator)
    import_file(dataset, write_jsonl(tmp_path / "t.jsonl", [{**GOOD[2], "tags": ["math", tag]}]))
    scrub.scan_examples(dataset)
    example = Example.objects.get(dataset=dataset)
    finding = PiiFinding.objects.get(example=example, entity_type="EMAIL_ADDRESS")
    assert example.segment_label(finding.segment) == "tag"
    assert tag in client_for(curator).get(reverse("datasets:pii", args=[dataset.pk])).content.decode()
    scrub.apply_all(dataset, curator)
    example.refresh_from_db()
    assert example.tags[0] == "math" and tag not in json.dumps(example.tags) + example.tags_text
    assert example.tags[1].startswith("<EMAIL_ADDRESS") and example.tags_text == f"|math|{example.tags[1]}|"
    version = versions.freeze(dataset, curator, "clean")
    assert tag not in json.dumps(version.counts)


# --- command line: bad input is a one-line error naming the argument, and nothing is left behind ---------


def test_commands_refuse_arguments_that_are_not_utf8_text(curator):
    with pytest.raises(CommandError, match="USERNAME: not valid UTF-8"):
        call_command("create_user", "g\udcffh", "--role", "curator", stdout=StringIO())
    with pytest.raises(CommandError, match="--name: not valid UTF-8"):
        call_command("import_dataset", "/dev/null", "--name", "x\udcff", stdout=StringIO())


def test_import_of_a_file_whose_name_is_not_utf8(curator, tmp_path, settings):
    from pathlib import Path

    path = Path(str(tmp_path / "nonutf") + "\udcff.jsonl")  # the file system allows any bytes
    write_jsonl(path, GOOD[2:])
    call_command("import_dataset", str(path), "--name", "Bytes", stdout=StringIO(), stderr=StringIO())
    upload = Upload.objects.get()
    assert upload.original_name == "nonutf\ufffd.jsonl"
    assert not list((Path(settings.DATA_DIR) / "uploads" / "incoming").glob("*"))


def test_import_command_names_and_users_are_checked(curator, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", GOOD[2:])
    call_command("import_dataset", str(path), "--name", "Same", stdout=StringIO(), stderr=StringIO())
    # the same name with a trailing space is the same dataset (names are stored stripped)
    call_command("import_dataset", str(path), "--name", "Same ", stdout=StringIO(), stderr=StringIO())
    assert Example.objects.filter(dataset__name="Same").count() == 2
    with pytest.raises(CommandError, match="1 to 120 characters"):
        call_command("import_dataset", str(path), "--name", "  ", stdout=StringIO())
    with pytest.raises(CommandError, match="--user: no user called"):
        call_command("import_dataset", str(path), "--name", "Other", "--user", "nobody", stdout=StringIO())


def test_register_base_model_keeps_its_files_inside_the_models_dir(tmp_path, settings):
    from pathlib import Path

    gguf = tmp_path / "bogus.gguf"
    gguf.write_bytes(b"not a gguf")
    for name in ("../../escape", "/tmp/abs", "with space"):
        with pytest.raises(CommandError, match="Name: use letters"):
            call_command("register_base_model", "--gguf", str(gguf), "--name", name, stdout=StringIO())
    assert not list(Path(settings.DATA_DIR).parent.glob("*escape*"))
    with pytest.raises(CommandError, match="could not be registered"):
        call_command("register_base_model", "--gguf", str(gguf), "--name", "bogus", stdout=StringIO())
    empty = tmp_path / "nomodel"
    empty.mkdir()
    (empty / "config.json").write_text("[]")
    with pytest.raises(CommandError, match="holds no .safetensors"):
        call_command("register_base_model", "--dir", str(empty), stdout=StringIO())


def test_other_commands_bad_input(admin_user, curator, tmp_path, settings):
    with pytest.raises(CommandError, match="64 hexadecimal"):
        call_command("verify_audit", "--expect", "nothex", stdout=StringIO())
    dataset = scanned(datasets.create_dataset("Out", "sft", curator), tmp_path, rows=GOOD[2:])
    version = versions.freeze(dataset, curator, "v1")
    with pytest.raises(CommandError, match="could not be written"):
        call_command("export_dataset", str(version.pk), "--out", "/proc/x.jsonl", stdout=StringIO())
    settings.STUDIO_ENCRYPTION_KEY = "garbage"
    with pytest.raises(CommandError, match="key 1 of 1 is not a Fernet key"):
        call_command("rotate_encryption_key", stdout=StringIO())


def test_setup_refuses_a_plain_user_called_admin(make_user, monkeypatch):
    monkeypatch.delenv("STUDIO_ADMIN_PASSWORD", raising=False)
    make_user("admin", "curator")
    with pytest.raises(CommandError, match="called 'admin' exists but is not an admin"):
        call_command("setup_studio", "--skip-model", "--skip-demo", stdout=StringIO(), stderr=StringIO())
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "x")
    from django.contrib.auth import get_user_model

    get_user_model().objects.filter(username="admin").delete()
    with pytest.raises(CommandError, match="STUDIO_ADMIN_PASSWORD: This password is too short"):
        call_command("setup_studio", "--skip-model", "--skip-demo", stdout=StringIO(), stderr=StringIO())


def test_job_settings_that_the_worker_would_refuse_are_refused_at_launch(
    engineer, admin_user, curator, tiny_model_dir
):
    from pathlib import Path

    from conftest import make_version, smoke_request

    from training_app.services import jobs, register_local_dir

    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_version(curator)
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(
            smoke_request(version, base, packing="maybe", target_modules="q_proj bogus_proj"), engineer
        )
    text = " | ".join(refused.value.problems)
    assert "Packing: “maybe” is not true or false" in text
    assert "Target modules: bogus_proj not in tiny-llama, whose layers are" in text and "q_proj" in text
    with pytest.raises(serving.KeyRefused, match="at most 100 characters"):
        serving.create_key(engineer, "k" * 101)


# --- background work: the watchdog with the broker down, superseded attempts, cancels that race ------------


@pytest.fixture
def running_job(engineer, admin_user, curator, tiny_model_dir, settings):
    """A factory: a claimed (running) training job, its heartbeat old enough for the watchdog."""
    from datetime import timedelta
    from pathlib import Path

    from conftest import make_version, smoke_request
    from django.utils import timezone

    from training_app.models import TrainingJob
    from training_app.services import jobs, register_local_dir

    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 3600
    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_version(curator)

    def make(stale=True):
        job = jobs.create_job(smoke_request(version, base), engineer, enqueue=False)
        job = jobs.claim(job.pk, "w1")
        if stale:
            TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
        return job

    return make


def _broker_down(monkeypatch):
    from kombu.exceptions import OperationalError

    def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr("training_app.tasks.run_next.delay", down)
    monkeypatch.setattr("datasets_app.tasks.process_upload.delay", down)


def test_watchdog_with_the_broker_down_fails_work_with_a_reason_and_goes_on(
    running_job, curator, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    from datetime import timedelta

    from django.utils import timezone

    from studio.tasks import watchdog
    from training_app.models import TrainingJob

    first, second = running_job(), running_job()
    dataset = datasets.create_dataset("Stuck", "sft", curator)
    from datasets_app.services import imports

    upload = imports.receive_path(dataset, None, write_jsonl(tmp_path / "u.jsonl", GOOD))
    Upload.objects.filter(pk=upload.pk).update(
        status="processing", started_at=timezone.now() - timedelta(hours=1), attempts=1
    )
    _broker_down(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
        report = watchdog()
    assert sorted(report["jobs"]["requeued"]) == sorted([first.pk, second.pk])
    for job in TrainingJob.objects.filter(pk__in=[first.pk, second.pk]):
        assert job.state == "failed" and job.error_code == "queue_unreachable"  # not left queued
    upload.refresh_from_db()
    assert upload.status == "failed" and upload.raw_path == ""
    assert report["evals"] == {"requeued": [], "failed": [], "cancelled": []}


def test_a_superseded_training_attempt_writes_nothing(running_job, monkeypatch):
    from training_app.models import TrainingJob, TrainingMetric
    from training_app.services import jobs

    job = running_job()
    old = jobs.JobReporter(job)
    monkeypatch.setattr("training_app.tasks.run_next.delay", lambda *a, **k: None)
    jobs.requeue_stale()
    newer = jobs.claim(job.pk, "w2")
    assert newer.attempt == 2
    old.on_step(step=4, total_steps=5, metrics={"loss": 9.9})
    old.on_eval(step=4, metrics={"eval_loss": 9.9})
    old.on_log("from the old attempt")
    assert old.lost and not TrainingMetric.objects.filter(job=job).exists()
    assert not old.may_publish() and jobs.JobReporter(newer).may_publish()
    assert not any("old attempt" in line for line in TrainingJob.objects.get(pk=job.pk).log_tail)


def test_a_cancel_that_races_the_watchdog_cancels_and_a_cancelled_queued_job_is_never_claimed(
    running_job, engineer, monkeypatch
):
    from training_app.models import TrainingJob
    from training_app.services import jobs

    job = running_job()
    real = jobs.counted_attempts

    def cancel_meanwhile(j):  # the cancel commits between the watchdog's read and its update
        TrainingJob.objects.filter(pk=j.pk).update(cancel_requested=True)
        return real(j)

    monkeypatch.setattr(jobs, "counted_attempts", cancel_meanwhile)
    assert jobs.requeue_stale()["cancelled"] == [job.pk]
    assert TrainingJob.objects.get(pk=job.pk).state == "cancelled"
    queued = running_job()
    TrainingJob.objects.filter(pk=queued.pk).update(state="queued", claim_token="", cancel_requested=True)
    assert jobs.claim(queued.pk, "w3") is None


def test_cancelling_a_running_job_twice_records_one_event(running_job, engineer):
    from conftest import job_verbs

    from training_app.services import jobs

    job = running_job(stale=False)
    jobs.cancel(job, engineer)
    jobs.cancel(job, engineer)
    assert job_verbs(job).count("training.job.cancel") == 1


def test_a_superseded_import_attempt_changes_nothing(curator, tmp_path, monkeypatch):
    from datasets_app.services import imports

    dataset = datasets.create_dataset("Twice", "sft", curator)
    upload = imports.receive_path(dataset, None, write_jsonl(tmp_path / "t.jsonl", GOOD))
    real_open = imports._open_source

    def newer_attempt_took_it(up, *args):  # the watchdog requeued it and another worker claimed it
        Upload.objects.filter(pk=up.pk).update(attempts=up.attempts + 1)
        return real_open(up, *args)

    monkeypatch.setattr(imports, "_open_source", newer_attempt_took_it)
    assert imports.process(upload.pk) is None
    upload.refresh_from_db()
    assert upload.status == "processing" and upload.attempts == 2 and upload.raw_path
    assert not Example.objects.filter(dataset=dataset).exists()


def test_a_merge_asked_while_the_broker_is_down_fails_and_can_be_asked_again(
    running_job, engineer, monkeypatch, django_capture_on_commit_callbacks
):
    from kombu.exceptions import OperationalError

    from training_app.models import TrainingJob
    from training_app.services import jobs

    job = running_job(stale=False)
    final = job.output_dir / "final"
    final.mkdir(parents=True)
    TrainingJob.objects.filter(pk=job.pk).update(state="succeeded", artifacts_dir=str(final))
    job.refresh_from_db()

    def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr("training_app.tasks.merge_job.delay", down)
    with pytest.raises(OperationalError), django_capture_on_commit_callbacks(execute=True):
        jobs.request_merge(job, engineer)
    job.refresh_from_db()
    assert job.merge_state == "failed" and "unreachable" in job.merge_error
    monkeypatch.setattr("training_app.tasks.merge_job.delay", lambda *a, **k: None)
    jobs.request_merge(job, engineer)
    job.refresh_from_db()
    assert job.merge_state == "pending"
