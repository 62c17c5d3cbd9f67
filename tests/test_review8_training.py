"""Review 8 of the training app: launch checks (model line, all-linear, empty replay), queue priority
bounds, resuming on a retired base model, half-written merge artifacts, base model paths the file system
rejects, and the trainer CLI's config types. Service- and view-level; no training step runs."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from conftest import make_version, smoke_request
from django.core.management import CommandError, call_command
from django.urls import reverse
from test_training_jobs import _no_heartbeat_thread_writes as _no_heartbeat_thread_writes  # noqa: F401
from test_training_jobs import sft_version as sft_version  # noqa: F401 - the fixtures
from test_training_jobs import tiny_base as tiny_base  # noqa: F401

from training_app.models import BaseModel, TrainingJob
from training_app.services import jobs

pytestmark = pytest.mark.django_db


def _train(*args):
    out = StringIO()
    call_command("train", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


# --- launch checks ------------------------------------------------------------------------------------


def test_cli_model_line_longer_than_the_column_is_refused_naming_the_limit(engineer, sft_version, tiny_base):
    """The form caps the model line at 100 characters, `manage.py train --model-name` did not: a 150-character
    slug was queued (and PostgreSQL fails the insert with a traceback)."""
    args = ["--dataset-version", str(sft_version.pk), "--base-model", "tiny-llama", "--preset", "smoke"]
    with pytest.raises(CommandError) as exc:
        _train(*args, "--model-name", "a" * 150, "--by", engineer.username)
    assert "Model line: at most 100 characters (got 150)" in str(exc.value)
    assert not TrainingJob.objects.exists()
    assert _train(*args, "--model-name", "a" * 100, "--by", engineer.username).startswith("job ")


def test_all_linear_target_modules_is_accepted_for_adapter_methods(engineer, sft_version, tiny_base):
    """The form says "Space-separated module names, or all-linear" and the QLoRA preset uses all-linear, but
    the layer-name check refused it as an unknown module, so no adapter job could target all layers."""
    request = smoke_request(sft_version, tiny_base, target_modules="all-linear")
    _config, _name, problems, figures = jobs.preview(request)
    assert problems == [] and figures["steps"] == 5
    job = jobs.create_job(request, engineer)
    assert job.config["target_modules"] == ["all-linear"]
    # a real typo is still refused, naming the model's layers
    _c, _n, problems, _f = jobs.preview(smoke_request(sft_version, tiny_base, target_modules="all-linaer"))
    assert any("all-linaer not in tiny-llama" in p for p in problems)


def test_replay_from_a_version_without_train_examples_is_refused(engineer, curator, sft_version, tiny_base):
    """Replaying 20% from a version with no train examples launched a job that silently replayed nothing."""
    empty = make_version(curator, name="other", train=0, eval_=2)
    request = smoke_request(sft_version, tiny_base)
    request.replay_version, request.replay_percent = empty, 20
    with pytest.raises(jobs.JobRefused) as exc:
        jobs.create_job(request, engineer)
    assert any("Replay from other v1: it has no examples in the train split" in p for p in exc.value.problems)
    assert not TrainingJob.objects.exists()


# --- the queue and resuming ---------------------------------------------------------------------------


def test_priority_clicks_stay_within_the_launch_bounds(client_for, engineer, sft_version, tiny_base):
    """A launch refuses a priority outside -1000..1000, but the ▲/▼ buttons moved a job past it."""
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    TrainingJob.objects.filter(pk=job.pk).update(priority=1000)
    with pytest.raises(jobs.JobRefused, match="between -1000 and 1000"):
        jobs.set_priority(job, 1, engineer)
    client = client_for(engineer)
    response = client.post(reverse("training:job_priority", args=[job.pk]), {"direction": "up"}, follow=True)
    assert b"already at the limit" in response.content
    job.refresh_from_db()
    assert job.priority == 1000
    assert jobs.set_priority(job, -1, engineer).priority == 999  # back down is fine
    TrainingJob.objects.filter(pk=job.pk).update(priority=-1000)
    with pytest.raises(jobs.JobRefused, match="already at the limit"):
        jobs.set_priority(job, -1, engineer)


def _failed_with_checkpoint(job: TrainingJob) -> None:
    checkpoint = job.output_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (checkpoint / "adapter_model.safetensors").write_text("weights")
    TrainingJob.objects.filter(pk=job.pk).update(state="failed", error_code="oom", step=2)


def test_resume_on_a_retired_base_model_is_refused(client_for, engineer, admin_user, sft_version, tiny_base):
    """A retired base model is refused at launch, but "Resume from checkpoint" put a failed job on it
    straight back in the queue."""
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    _failed_with_checkpoint(job)
    BaseModel.objects.filter(pk=tiny_base.pk).update(status=BaseModel.Status.RETIRED)
    with pytest.raises(jobs.JobRefused, match="Base model tiny-llama is retired"):
        jobs.resume(job, engineer)
    response = client_for(engineer).post(reverse("training:job_resume", args=[job.pk]), follow=True)
    assert b"tiny-llama is retired" in response.content
    job.refresh_from_db()
    assert job.state == "failed"
    BaseModel.objects.filter(pk=tiny_base.pk).update(status=BaseModel.Status.ACTIVE)
    assert jobs.resume(job, engineer).state == "queued"  # reactivated: it resumes


# --- artifacts and base models -----------------------------------------------------------------------


def test_half_written_merge_folder_is_neither_listed_nor_downloadable(
    client_for, engineer, sft_version, tiny_base
):
    """While a merge runs it writes into a hidden folder, final/.merged-<random>, before renaming it to
    merged/: the job page listed those half-written files as artifacts and served them for download."""
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    final = job.output_dir / "final"
    (final / ".merged-abcd1234").mkdir(parents=True)
    (final / ".merged-abcd1234" / "model.safetensors").write_text("half")
    (final / "merged").mkdir()
    (final / "merged" / "model.safetensors").write_text("whole")
    (final / "model_card.md").write_text("# card")
    TrainingJob.objects.filter(pk=job.pk).update(state="succeeded", artifacts_dir=str(final))
    job.refresh_from_db()
    assert [f["name"] for f in jobs.artifact_files(job)] == ["merged/model.safetensors", "model_card.md"]
    client = client_for(engineer)
    url = reverse("training:job_artifact", args=[job.pk, ".merged-abcd1234/model.safetensors"])
    assert client.get(url).status_code == 404
    ok = client.get(reverse("training:job_artifact", args=[job.pk, "merged/model.safetensors"]))
    assert ok.status_code == 200 and b"".join(ok.streaming_content) == b"whole"


@pytest.mark.parametrize(
    ("kind", "source"), [("local_dir", "/" + "a" * 400), ("gguf", "/" + "a" * 400 + ".gguf")]
)
def test_base_model_path_too_long_for_the_file_system_is_a_form_error(client_for, admin_user, kind, source):
    """A path with a component over 255 characters made `is_file()` raise ENAMETOOLONG: a 500 page."""
    response = client_for(admin_user).post(
        reverse("training:base_model_add"), {"name": "m1", "source_kind": kind, "source": source}
    )
    assert response.status_code == 200
    assert b"is not a" in response.content and b"on this server" in response.content
    assert not BaseModel.objects.exists()


# --- the trainer's own command line --------------------------------------------------------------------


def test_trainer_cli_config_with_wrong_types_is_a_config_error(tmp_path, capsys):
    """`python -m training_app.trainer --config job.json` with "lora_r": "16" (a string) crashed with a
    TypeError traceback inside validation instead of the documented JSON error line and exit status 2."""
    from training_app.trainer.__main__ import main

    base = {"method": "lora", "model_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
            "train_path": str(tmp_path / "train.jsonl")}  # fmt: skip
    cases = [
        ({**base, "lora_r": "16"}, 'lora_r: "16" is not a whole number.'),
        ({**base, "learning_rate": "0.1", "packing": "yes"}, 'learning_rate: "0.1" is not a finite number.'),
        ({**base, "target_modules": "q_proj"}, "target_modules: "),
        ({**base, "batch_size": None}, "batch_size: a value is required, not null."),
        ({"method": "lora"}, "Missing training setting(s): model_dir, output_dir, train_path."),
        ([1, 2], "The config must be a JSON object"),
    ]
    for index, (config, expected) in enumerate(cases):
        path = tmp_path / f"job{index}.json"
        path.write_text(json.dumps(config))
        for argv in (["--config", str(path)], ["--config", str(path), "--validate"]):
            assert main(argv) == 2, config
            event = json.loads(capsys.readouterr().out.splitlines()[-1])
            assert event["event"] == "error" and event["code"] == "config", event
            assert expected in event["message"], event
    (tmp_path / "nan.json").write_text('{"method": "lora", "model_dir": "x", "output_dir": "y", '
                                       '"train_path": "z", "weight_decay": NaN}')  # fmt: skip
    assert main(["--config", str(tmp_path / "nan.json"), "--validate"]) == 2
    assert "weight_decay: NaN is not a finite number." in capsys.readouterr().out


def test_priority_post_without_a_known_direction_moves_nothing(client_for, engineer, sft_version, tiny_base):
    """Any POST whose direction was not "up" (missing, misspelt) silently lowered the job's priority."""
    job = jobs.create_job(smoke_request(sft_version, tiny_base), engineer)
    client = client_for(engineer)
    for data in ({}, {"direction": "sideways"}):
        response = client.post(reverse("training:job_priority", args=[job.pk]), data, follow=True)
        assert "Direction: use the ▲ or ▼ button" in response.content.decode()
    job.refresh_from_db()
    assert job.priority == 0
    client.post(reverse("training:job_priority", args=[job.pk]), {"direction": "down"})
    job.refresh_from_db()
    assert job.priority == -1
