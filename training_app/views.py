"""Base model catalog and training job pages. Thin: parse, authorise, call a service, render."""

from __future__ import annotations

from collections import Counter

from django.contrib import messages
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from studio.htmx import render_htmx
from studio.roles import ADMIN, CURATOR, ENGINEER, role_required

from . import forms, services
from .models import BaseModel, TrainingJob
from .presets import PRESETS
from .services import jobs as job_service

# --- base models -------------------------------------------------------------------------------------


@role_required(ENGINEER, CURATOR)
def base_models(request):
    devices = job_service.known_devices()
    models = list(BaseModel.objects.all())
    active = Counter(
        TrainingJob.objects.filter(state__in=TrainingJob.ACTIVE_STATES).values_list("base_model_id", "state")
    )
    for model in models:
        ready = model.status == BaseModel.Status.ACTIVE and model.parameters
        model.fit = job_service.device_fit(model, devices) if ready else []
        model.queued_jobs = active[(model.pk, TrainingJob.State.QUEUED)]
        model.running_jobs = active[(model.pk, TrainingJob.State.RUNNING)]
    context = {"models": models, "devices": devices}
    return render(request, "training/base_models.html", context)


@role_required(ADMIN)
def base_model_add(request):
    form = forms.BaseModelForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            model = services.add_base_model(
                data["name"], data["source_kind"], data["source"], request.user, license=data["license"]
            )
        except services.BaseModelRefused as exc:
            form.add_error(None, str(exc))
        else:
            if model.status == BaseModel.Status.ACTIVE:
                messages.success(request, f"{model.name} is available for training.")
            else:
                messages.success(
                    request, f"{model.name} is being prepared by a worker; it appears here when done."
                )
            return redirect("training:base_models")
    return render(request, "training/base_model_add.html", {"form": form})


@role_required(ADMIN)
@require_POST
def base_model_status(request, pk: int):
    model = get_object_or_404(BaseModel, pk=pk)
    status = request.POST.get("status")
    if status not in (BaseModel.Status.ACTIVE, BaseModel.Status.RETIRED):
        messages.error(request, "Unknown status.")
    else:
        try:
            change = services.set_status(model, status, request.user)
        except services.BaseModelRefused as exc:
            messages.error(request, str(exc))
        else:
            label = BaseModel.Status(status).label.lower()
            text = f"{model.name} is now {label}."
            if status == BaseModel.Status.RETIRED:
                text += " " + _retire_outcome(change)
            messages.success(request, text)
    return redirect("training:base_models")


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


def _retire_outcome(change: services.StatusChange) -> str:
    """What retiring did to the jobs on the model, in the words of the success message."""
    cancelled = len(change.cancelled_jobs)
    if cancelled:
        shown = change.cancelled_jobs[:10]
        ids = ", ".join(f"#{pk}" for pk in shown) + (", …" if cancelled > len(shown) else "")
        text = (
            f"{_jobs(cancelled)} still queued on it {'was' if cancelled == 1 else 'were'} cancelled ({ids}); "
            "each job's page tells its owner why and to launch again on another base model."
        )
    else:
        text = "No queued job was waiting on it."
    running = change.running_jobs
    if running:
        text += f" {_jobs(running)} already running on it {'is' if running == 1 else 'are'} left to finish."
    return text


# --- jobs --------------------------------------------------------------------------------------------


@role_required(ENGINEER)
def jobs(request):
    positions = job_service.queue_positions()
    rows = TrainingJob.objects.select_related("created_by", "base_model", "dataset_version__dataset")
    running = list(rows.filter(state=TrainingJob.State.RUNNING).order_by("started_at"))
    queued = sorted(rows.filter(state=TrainingJob.State.QUEUED), key=lambda j: positions.get(j.pk, 0))
    finished = rows.filter(state__in=TrainingJob.FINAL_STATES).order_by("-finished_at", "-pk")[:50]
    for job in queued:
        job.position = positions.get(job.pk)
        job.manageable = job_service.can_manage(job, request.user)
    for job in running:
        job.manageable = job_service.can_manage(job, request.user)
    context = {"running": running, "queued": queued, "finished": finished}
    return render_htmx(request, "training/jobs.html", "training/partials/job_queue.html", context)


def _job_request(form: forms.JobForm):
    data = form.cleaned_data
    return job_service.JobRequest(
        dataset_version=data["dataset_version"],
        base_model=data["base_model"],
        method=data["method"],
        config=form.config(),
        model_name=data.get("model_name") or "",
        preset=data.get("preset") or "",
        replay_version=data.get("replay_version"),
        replay_percent=data.get("replay_percent") or 0.0,
        merge=data.get("merge", False),
    )


@role_required(ENGINEER)
def job_new(request):
    if request.method == "POST":
        form = forms.JobForm(request.POST)
        if form.is_valid():
            try:
                job = job_service.create_job(_job_request(form), request.user)
            except job_service.JobRefused as exc:
                for problem in exc.problems:
                    form.add_error(None, problem)
            else:
                messages.success(request, f"Job {job.pk} queued.")
                return redirect(job)
    else:
        preset = request.GET.get("preset")
        initial = forms.initial_for(preset)
        if request.GET.get("dataset_version"):
            initial["dataset_version"] = request.GET["dataset_version"]
        form = forms.JobForm(initial=initial)
    return render(request, "training/job_new.html", {"form": form, "presets": PRESETS})


@role_required(ENGINEER)
@require_POST
def job_estimate(request):
    """HTMX: tokens, steps and memory for the form as it stands (or what to fix first)."""
    form = forms.JobForm(request.POST)
    context: dict = {}
    if form.is_valid():
        _config, _name, context["problems"], context["estimate"] = job_service.preview(_job_request(form))
    else:
        context["problems"] = [
            f"{form.fields[name].label or name.replace('_', ' ').capitalize()}: {' '.join(errors)}"
            if name in form.fields
            else " ".join(errors)
            for name, errors in form.errors.items()
        ]
    return render(request, "training/partials/estimate.html", context)


def _live_context(job: TrainingJob, request) -> dict:
    curves: dict[str, dict[str, list]] = {"loss": {}, "lr": {}, "speed": {}}
    names = {"loss": "train loss", "eval_loss": "eval loss"}
    for step, name, value in job.metrics.values_list("step", "name", "value").order_by("step"):
        if name in names:
            curves["loss"].setdefault(names[name], []).append((step, value))
        elif name == "learning_rate":
            curves["lr"].setdefault("learning rate", []).append((step, value))
        elif name == "tokens_per_second":
            curves["speed"].setdefault("tokens/s", []).append((step, value))
    position = job_service.queue_positions().get(job.pk) if job.state == TrainingJob.State.QUEUED else None
    artifacts = job_service.artifact_files(job)
    return {
        "job": job,
        "curves": curves,
        "position": position,
        "manageable": job_service.can_manage(job, request.user),
        "artifacts": artifacts,
        "merge_possible": job.state == TrainingJob.State.SUCCEEDED
        and job.method != TrainingJob.Method.SFT
        and job.merge_state != TrainingJob.Merge.PENDING
        and not any(f["name"].startswith("merged/") for f in artifacts),
        "resume_from": _resume_from(job),
        "version": getattr(job, "model_version", None) if job.state == TrainingJob.State.SUCCEEDED else None,
    }


def _resume_from(job: TrainingJob) -> int | None:
    """The checkpoint step a failed or cancelled job can resume from (None: no resume button)."""
    problem, found = job_service.resume_check(job)
    return None if problem else found[0]


def _job(pk: int) -> TrainingJob:
    return get_object_or_404(
        TrainingJob.objects.select_related("base_model", "dataset_version__dataset", "created_by"), pk=pk
    )


@role_required(ENGINEER)
def job_detail(request, pk: int):
    job = _job(pk)
    context = _live_context(job, request)
    # in the form's order (PostgreSQL's jsonb keeps keys in its own order), unknown keys last
    order = {name: i for i, name in enumerate(job_service.CONFIG_FIELDS)}
    items = sorted(job.config.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    context["config_items"] = [(key, _config_label(key), _config_shown(value)) for key, value in items]
    return render(request, "training/job.html", context)


def _config_label(key: str) -> str:
    """The job form's label for a training setting (the key itself for one the form does not have)."""
    field = forms.JobForm.base_fields.get(key)
    label = field.label if field is not None and field.label else key.replace("_", " ").capitalize()
    return str(label)


def _config_shown(value) -> str:
    """A setting as the form would show it: on/off, names separated by spaces, "not set"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "not set"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


@role_required(ENGINEER)
def job_live(request, pk: int):
    job = _job(pk)
    return render(request, "training/partials/job_live.html", _live_context(job, request))


@role_required(ENGINEER)
@require_POST
def job_cancel(request, pk: int):
    job = _job(pk)
    try:
        job = job_service.cancel(job, request.user)
    except job_service.JobRefused as exc:
        messages.error(request, str(exc))
    else:
        if job.state == TrainingJob.State.CANCELLED:
            messages.success(request, f"Job {job.pk} cancelled.")
        else:
            messages.success(request, f"Job {job.pk} stops after its current step and keeps its checkpoint.")
    return redirect(job)


@role_required(ENGINEER)
@require_POST
def job_resume(request, pk: int):
    job = _job(pk)
    try:
        job = job_service.resume(job, request.user)
    except job_service.JobRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request,
            f"Job {job.pk} is back in the queue; it resumes from its checkpoint at step {job.checkpoint_step}.",
        )
    return redirect(job)


@role_required(ENGINEER)
@require_POST
def job_priority(request, pk: int):
    job = _job(pk)
    delta = {"up": 1, "down": -1}.get(request.POST.get("direction"))
    if delta is None:  # not one of the two buttons: move nothing rather than guess "down"
        messages.error(request, "Direction: use the ▲ or ▼ button (direction up or down).")
        return redirect("training:jobs")
    try:
        job_service.set_priority(job, delta, request.user)
    except job_service.JobRefused as exc:
        messages.error(request, str(exc))
    return redirect("training:jobs")


@role_required(ENGINEER)
@require_POST
def job_merge(request, pk: int):
    job = _job(pk)
    try:
        job_service.request_merge(job, request.user)
    except job_service.JobRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, "Merging the adapter into a full model; it appears under Artifacts when done."
        )
    return redirect(job)


@role_required(ENGINEER)
def job_artifact(request, pk: int, name: str):
    job = _job(pk)
    path = job_service.artifact_path(job, name)
    if path is None:
        raise Http404("No such artifact.")
    return FileResponse(open(path, "rb"), as_attachment=True, filename=path.name)
